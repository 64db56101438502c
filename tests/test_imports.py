"""The module graph of ``unimo_jax`` and ``data_pipelines`` (every import, lazy ones included,
read with ``ast``): no import cycles, and no edge from ``unimo_jax`` outside its command modules
to ``data_pipelines`` or TensorFlow.

Edges follow the project's checker: ``import a.b`` and ``from a.b import c`` name ``a.b`` and
``a.b.c``, each resolved to the longest module of the two packages it names; a module's own
package ``__init__`` is not an edge (importing ``a.b.c`` runs ``a.b``'s ``__init__``, which is
not an import the module wrote).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("unimo_jax", "data_pipelines")
FORBIDDEN = ("tensorflow", "tensorflow_datasets")


def is_command(module: str) -> bool:
  """The modules that wire data in: ``unimo_jax/cli.py``, ``*/main.py``, ``*/cli.py``."""
  return module == "unimo_jax.cli" or module.endswith(".main") or module.endswith(".cli")


def modules(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: path} of every .py file of the two packages."""
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(root, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(d, f)
          name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def import_graph(mods: dict[str, str]) -> tuple[dict[str, set], list[tuple[str, str]]]:
  """(edges {module: modules it imports}, [(module, forbidden import)])."""
  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  edges, forbidden = {}, []
  for m, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for n in names:
        if n.split(".")[0] in FORBIDDEN:
          forbidden.append((m, n))
        r = resolve(n)
        if r and r != m and not (m.startswith(r + ".") and mods[r].endswith("__init__.py")):
          out.add(r)
    edges[m] = out
  return edges, forbidden


def cycles(edges: dict[str, set]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
  for start in edges:
    if start in index:
      continue
    work = [(start, iter(sorted(edges.get(start, ()))))]
    index[start] = low[start] = counter[0]
    counter[0] += 1
    stack.append(start)
    on.add(start)
    while work:
      v, it = work[-1]
      w = next(it, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = counter[0]
          counter[0] += 1
          stack.append(w)
          on.add(w)
          work.append((w, iter(sorted(edges.get(w, ())))))
        elif w in on:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        comp = []
        while True:
          w = stack.pop()
          on.discard(w)
          comp.append(w)
          if w == v:
            break
        if len(comp) > 1:
          out.append(sorted(comp))
  return out


@pytest.fixture(scope="module")
def graph():
  mods = modules()
  assert len(mods) > 50 and "unimo_jax.train.trainer" in mods
  return import_graph(mods)


def test_no_import_cycles(graph):
  edges, _ = graph
  found = cycles(edges)
  assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_only_command_modules_import_data_pipelines_or_tensorflow(graph):
  edges, forbidden = graph
  bad = [f"{m} -> {r}" for m, out in edges.items() if m.startswith("unimo_jax.")
         and not is_command(m) for r in out if r.split(".")[0] == "data_pipelines"]
  bad += [f"{m} -> {n}" for m, n in forbidden if m.startswith("unimo_jax") and not is_command(m)]
  assert not bad, bad


def test_the_checker_finds_a_cycle_and_a_crossing(tmp_path):
  """The rules on a hand-made tree: a lazy import closes a cycle; a non-command module reaching
  data_pipelines is a crossing, a command module is not; a package's own __init__ is no edge."""
  files = {
      "unimo_jax/__init__.py": "",
      "unimo_jax/a.py": "from unimo_jax import b\n",
      "unimo_jax/b.py": "def f():\n  from unimo_jax.a import g\n",
      "unimo_jax/c.py": "import data_pipelines.x\n",
      "unimo_jax/main.py": "from data_pipelines import x\nimport tensorflow as tf\n",
      "unimo_jax/sub/__init__.py": "from unimo_jax.sub import d\n",
      "unimo_jax/sub/d.py": "import unimo_jax.sub\n",
      "data_pipelines/__init__.py": "",
      "data_pipelines/x.py": "import tensorflow\nfrom unimo_jax import masking_free\n",
  }
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  edges, forbidden = import_graph(modules(str(tmp_path)))
  assert cycles(edges) == [["unimo_jax.a", "unimo_jax.b"]]
  assert edges["unimo_jax.c"] == {"data_pipelines.x"}
  assert edges["unimo_jax.sub.d"] == set()  # its own package
  assert edges["data_pipelines.x"] == {"unimo_jax"}  # an unknown name resolves to the package
  assert not is_command("unimo_jax.c") and is_command("unimo_jax.main")
  assert sorted(forbidden) == [("data_pipelines.x", "tensorflow"), ("unimo_jax.main", "tensorflow")]
