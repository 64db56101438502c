"""Captions of synthetic scenes: claims, templates, parsing, truth and exact rewrites.

A caption states a ``Claim``: the objects it mentions (size, colour, shape each), relations
between them, and for a one-object scene the object's location. All captions of a scene state
the same claim through different templates, so they are true paraphrases of each other. A
claim is true for a scene when its objects can be matched to distinct objects of the scene
with every relation and location holding (``holds``).

Hard negatives are exact scene-graph rewrites of the claim (change one object's size, colour or
shape, change a relation or the location, or exchange an attribute between two objects),
rendered with the template of a true caption — so a negative differs from a true caption by
one word or one exchange — and kept only when ``holds`` says they are false for the scene.

Every template can be parsed back (``parse``): templates are compiled into regular
expressions, so the claim of any caption is recoverable from its text alone.
"""
import dataclasses
import itertools
import re

import numpy as np

from data_pipelines.synthetic_scenes import scene as scene_lib
from data_pipelines.synthetic_scenes.scene import COLOURS, SHAPES, SIZES

# Location phrases for one-object scenes: name -> (row or None, col or None, phrase).
# A phrase constrains only what it names ("on the left" = column 0, any row).
LOCATIONS = {
    "top_left": (0, 0, "in the top left corner"),
    "top": (0, None, "at the top"),
    "top_right": (0, 2, "in the top right corner"),
    "left": (None, 0, "on the left"),
    "center": (1, 1, "in the center"),
    "right": (None, 2, "on the right"),
    "bottom_left": (2, 0, "in the bottom left corner"),
    "bottom": (2, None, "at the bottom"),
    "bottom_right": (2, 2, "in the bottom right corner"),
}
CELL_LOCATION = {(0, 0): "top_left", (0, 1): "top", (0, 2): "top_right", (1, 0): "left",
                 (1, 1): "center", (1, 2): "right", (2, 0): "bottom_left", (2, 1): "bottom",
                 (2, 2): "bottom_right"}

# Relation phrases. "r": "A {r} B" states A pred B. "it": "A is {it}" states A pred <it>.
REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above",
              "below": "below"}
REL_IT = {"left": "on its left", "right": "on its right", "above": "above it",
          "below": "below it"}

# Templates by number of objects. Placeholders: d{i} "size colour shape" of object i;
# s{i}/c{i}/h{i} its size/colour/shape alone; r{ij} relation phrase of (i pred j);
# i{ij} the inverse phrase (states the same fact with j as subject); it{ij} the "its" form
# with i as subject; iit{ij} the "its" form with j as subject; loc the location phrase.
TEMPLATES = {
    1: (
        "a {d0} {loc}.",
        "there is a {d0} {loc}.",
        "{loc}, there is a {d0}.",
        "a {s0} {h0} that is {c0}, {loc}.",
    ),
    2: (
        "a {d0} {r01} a {d1}.",
        "there is a {d1}, and a {d0} is {it01}.",
        "a {d1} {i01} a {d0}.",
        "a {d0} and a {d1}; the {d0} is {r01} the {d1}.",
    ),
    3: (
        "a {d0} {r01} a {d1}, and a {d2} {i12} the {d1}.",
        "there is a {d1}; a {d0} is {it01} and a {d2} is {iit12}.",
        "a {d0}, a {d1} and a {d2}: the {d0} is {r01} the {d1}, and the {d1} is {r12} the {d2}.",
        "a {d1} is {i01} a {d0} and {r12} a {d2}.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Claim:
  """What a caption states.

  objects: tuple of (size, colour, shape) index triples, one per mentioned object.
  relations: tuple of (i, predicate, j) over indices into ``objects``.
  location: a ``LOCATIONS`` key for objects[0], or None.
  """
  objects: tuple
  relations: tuple = ()
  location: str = None

  def key(self):
    """The claim's meaning, independent of object order and of which of two inverse
    predicates states a relation: equal keys <=> equivalent claims (objects of a claim are
    distinct descriptions, as in every scene)."""
    facts = set()
    for i, p, j in self.relations:
      a, b = self.objects[i], self.objects[j]
      if p in ("right", "below"):
        a, b, p = b, a, scene_lib.INVERSE[p]
      facts.add((a, p, b))
    return (tuple(sorted(self.objects)), tuple(sorted(facts)), self.location)


def scene_claim(scene: scene_lib.Scene, rng: np.random.Generator) -> Claim:
  """The claim all captions of ``scene`` state: every object, a chain of relations
  (object k to object k+1, one true predicate chosen at random), and the location of a lone
  object."""
  objects = tuple(o.attributes for o in scene.objects)
  relations = []
  for k in range(len(objects) - 1):
    true = [p for p in scene_lib.RELATIONS if scene.relation_holds(k, p, k + 1)]
    relations.append((k, true[int(rng.integers(len(true)))], k + 1))
  location = None
  if len(objects) == 1:
    o = scene.objects[0]
    location = CELL_LOCATION[(o.row, o.col)]
  return Claim(objects=objects, relations=tuple(relations), location=location)


def holds(claim: Claim, scene: scene_lib.Scene) -> bool:
  """True when the claim is true of the scene (an injective match of mentioned objects)."""
  objs = scene.objects
  for assign in itertools.permutations(range(len(objs)), len(claim.objects)):
    if any(objs[a].attributes != want for a, want in zip(assign, claim.objects)):
      continue
    if not all(scene.relation_holds(assign[i], p, assign[j]) for i, p, j in claim.relations):
      continue
    if claim.location is not None:
      row, col, _ = LOCATIONS[claim.location]
      o = objs[assign[0]]
      if (row is not None and o.row != row) or (col is not None and o.col != col):
        continue
    return True
  return False


# ---------------------------------------------------------------------------------------
# Rendering and parsing templates
# ---------------------------------------------------------------------------------------

_FIELD = re.compile(r"\{(d|s|c|h|r|i|it|iit|loc)(\d*)\}")


def _relation(claim: Claim, ij: str) -> str:
  i, j = int(ij[0]), int(ij[1])
  for a, p, b in claim.relations:
    if (a, b) == (i, j):
      return p
  raise ValueError(f"claim has no relation {i}->{j}")


def render_caption(claim: Claim, template: str) -> str:
  """Writes the claim with one template of ``TEMPLATES[len(claim.objects)]``."""
  def sub(m):
    kind, arg = m.group(1), m.group(2)
    if kind == "loc":
      return LOCATIONS[claim.location][2]
    if kind in ("d", "s", "c", "h"):
      size, colour, shape = claim.objects[int(arg)]
      return {"d": f"{SIZES[size]} {COLOURS[colour]} {SHAPES[shape]}", "s": SIZES[size],
              "c": COLOURS[colour], "h": SHAPES[shape]}[kind]
    p = _relation(claim, arg)
    return {"r": REL_PHRASE[p], "i": REL_PHRASE[scene_lib.INVERSE[p]], "it": REL_IT[p],
            "iit": REL_IT[scene_lib.INVERSE[p]]}[kind]
  return _FIELD.sub(sub, template)


def _alternatives(words) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_GROUPS = {
    "s": _alternatives(SIZES), "c": _alternatives(COLOURS), "h": _alternatives(SHAPES),
    "r": _alternatives(REL_PHRASE.values()), "i": _alternatives(REL_PHRASE.values()),
    "it": _alternatives(REL_IT.values()), "iit": _alternatives(REL_IT.values()),
    "loc": _alternatives(v[2] for v in LOCATIONS.values()),
}


def _compile(template: str):
  """Template -> regex with a named group per field (repeats must match the same text)."""
  out, seen, pos = [], set(), 0
  for m in _FIELD.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    kind, arg = m.group(1), m.group(2)
    name = f"{kind}{arg}"
    if kind == "d":
      body = rf"(?P<s{arg}>{_GROUPS['s']}) (?P<c{arg}>{_GROUPS['c']}) (?P<h{arg}>{_GROUPS['h']})"
      sub_names = (f"s{arg}", f"c{arg}", f"h{arg}")
      if name in seen:
        body = " ".join(f"(?P={n})" for n in sub_names)
      seen.add(name)
      out.append(body)
    elif name in seen:
      out.append(f"(?P={name})")
    else:
      seen.add(name)
      out.append(f"(?P<{name}>{_GROUPS[kind]})")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("^" + "".join(out) + "$")


_COMPILED = [(n, t, _compile(t)) for n, ts in TEMPLATES.items() for t in ts]
_PHRASE_REL = {v: k for k, v in REL_PHRASE.items()}
_IT_REL = {v: k for k, v in REL_IT.items()}
_PHRASE_LOC = {v[2]: k for k, v in LOCATIONS.items()}


def parse(caption: str):
  """Recovers (claim, template) from a caption written by ``render_caption``; None if none
  of the templates matches."""
  for n, template, regex in _COMPILED:
    m = regex.match(caption)
    if not m:
      continue
    g = m.groupdict()
    objects = tuple((SIZES.index(g[f"s{k}"]), COLOURS.index(g[f"c{k}"]),
                     SHAPES.index(g[f"h{k}"])) for k in range(n))
    relations = {}
    for name, text in g.items():
      kind, arg = re.match(r"([a-z]+)(\d*)", name).groups()
      if kind in ("r", "i", "it", "iit") and text is not None:
        p = _PHRASE_REL[text] if kind in ("r", "i") else _IT_REL[text]
        if kind in ("i", "iit"):
          p = scene_lib.INVERSE[p]
        relations[(int(arg[0]), int(arg[1]))] = p
    rels = tuple((i, p, j) for (i, j), p in sorted(relations.items()))
    location = _PHRASE_LOC[g["loc"]] if g.get("loc") else None
    return Claim(objects=objects, relations=rels, location=location), template
  return None


# ---------------------------------------------------------------------------------------
# Exact rewrites (hard negatives)
# ---------------------------------------------------------------------------------------

def claim_rewrites(claim: Claim):
  """Every one-step rewrite of a claim, as (kind, claim) pairs.

  Kinds: "size", "colour", "shape" (one object's attribute replaced), "relation" (one
  predicate replaced), "location" (the lone object's location replaced), "swap_colour",
  "swap_shape", "swap_size" (an attribute exchanged between two objects).
  """
  out = []
  for k, attrs in enumerate(claim.objects):
    for a, (kind, vocab) in enumerate((("size", SIZES), ("colour", COLOURS), ("shape", SHAPES))):
      for v in range(len(vocab)):
        if v != attrs[a]:
          new = list(attrs)
          new[a] = v
          objs = claim.objects[:k] + (tuple(new),) + claim.objects[k + 1:]
          out.append((kind, Claim(objs, claim.relations, claim.location)))
  for r, (i, p, j) in enumerate(claim.relations):
    for q in scene_lib.RELATIONS:
      if q != p:
        rels = claim.relations[:r] + ((i, q, j),) + claim.relations[r + 1:]
        out.append(("relation", Claim(claim.objects, rels, claim.location)))
  if claim.location is not None:
    for loc in LOCATIONS:
      if loc != claim.location:
        out.append(("location", Claim(claim.objects, claim.relations, loc)))
  for a, kind in enumerate(("swap_size", "swap_colour", "swap_shape")):
    for i, j in itertools.combinations(range(len(claim.objects)), 2):
      oi, oj = list(claim.objects[i]), list(claim.objects[j])
      if oi[a] != oj[a]:
        oi[a], oj[a] = oj[a], oi[a]
        objs = list(claim.objects)
        objs[i], objs[j] = tuple(oi), tuple(oj)
        out.append((kind, Claim(tuple(objs), claim.relations, claim.location)))
  return out


def claim_is_seen(claim: Claim) -> bool:
  """True when no mentioned object has a held-out (colour, shape) combination."""
  return all(scene_lib.is_seen(c, h) for _, c, h in claim.objects)


def false_rewrites(claim: Claim, scene: scene_lib.Scene, seen_only: bool):
  """The rewrites of ``claim`` that are false for ``scene`` (and, with ``seen_only``, that
  mention no held-out combination), as (kind, claim) pairs."""
  return [(kind, c) for kind, c in claim_rewrites(claim)
          if (not seen_only or claim_is_seen(c)) and not holds(c, scene)]


def hard_negatives(claim: Claim, scene: scene_lib.Scene, rng: np.random.Generator,
                   count: int, seen_only: bool):
  """Up to ``count`` distinct false captions, as (caption, kind) pairs.

  Kinds are visited round-robin in a random order, so one scene's negatives mix attribute,
  shape, relation and exchange rewrites; each is written with a random template of the claim.
  """
  by_kind = {}
  for kind, c in false_rewrites(claim, scene, seen_only):
    by_kind.setdefault(kind, []).append(c)
  kinds = list(by_kind)
  order = rng.permutation(len(kinds))
  templates = TEMPLATES[len(claim.objects)]
  for k in kinds:
    by_kind[k] = [by_kind[k][i] for i in rng.permutation(len(by_kind[k]))]
  out, texts = [], set()
  while len(out) < count and any(by_kind[kinds[o]] for o in order):
    for o in order:
      pool = by_kind[kinds[o]]
      if pool and len(out) < count:
        text = render_caption(pool.pop(), templates[int(rng.integers(len(templates)))])
        if text not in texts:
          texts.add(text)
          out.append((text, kinds[o]))
  return out


def captions(scene: scene_lib.Scene, rng: np.random.Generator):
  """(claim, list of captions, one per template) for a scene."""
  claim = scene_claim(scene, rng)
  return claim, [render_caption(claim, t) for t in TEMPLATES[len(claim.objects)]]
