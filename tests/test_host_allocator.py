"""The CPU run's host allocator: the policy, the re-execution, and the effect on page faults."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from unimo_jax import cli, host_allocator as ha


def _decide(env, glibc=True, plugin=False):
  return ha.decide(env, glibc=glibc, plugin=lambda: plugin)


@pytest.mark.parametrize("env, glibc, plugin, expected", [
    ({}, True, False, "main_heap"),                                   # CPU-only install
    ({}, True, True, "system"),                                       # a GPU/TPU plugin
    ({"JAX_PLATFORMS": "cpu"}, True, True, "main_heap"),              # CPU asked for
    ({"JAX_PLATFORMS": "CPU, cuda"}, True, True, "main_heap"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, True, False, "system"),
    ({"JAX_PLATFORMS": "tpu"}, True, False, "system"),
    ({}, False, False, "system"),                                     # macOS, musl
    ({ha.ENV: "system"}, True, False, "system"),
    ({ha.ENV: "main_heap", "JAX_PLATFORMS": "cuda"}, True, True, "main_heap"),
    ({ha.ENV: "main_heap"}, False, False, "system"),                  # no glibc to tune
    ({"MALLOC_ARENA_MAX": "4"}, True, False, "system"),               # the caller's own choice
    ({"MALLOC_TRIM_THRESHOLD_": "0", ha.ENV: "main_heap"}, True, False, "system"),
    ({ha.APPLIED: "1", **ha.MAIN_HEAP}, True, True, "main_heap"),     # already re-executed
])
def test_policy(env, glibc, plugin, expected):
  assert _decide(env, glibc, plugin) == expected


def test_a_bad_policy_names_the_variable():
  with pytest.raises(ValueError, match=ha.ENV + ".*auto, main_heap, system"):
    _decide({ha.ENV: "jemalloc"})


def test_apply_re_executes_the_same_command_line_once_with_the_settings():
  calls = []
  argv = ["/usr/bin/python3", "/usr/local/bin/unimo-jax", "train", "--config", "c.py"]
  ha.apply({"JAX_PLATFORMS": "cpu", "HOME": "/h"}, argv,
           lambda exe, a, env: calls.append((exe, list(a), dict(env))), glibc=True)
  (exe, a, env), = calls
  assert exe == sys.executable and a == argv
  assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/h", ha.APPLIED: "1", **ha.MAIN_HEAP}
  # the re-executed process does not re-execute again, and a "system" policy never does
  for again in (env, {"JAX_PLATFORMS": "cpu", ha.ENV: "system"}, {"JAX_PLATFORMS": "cuda"}):
    calls.clear()
    ha.apply(again, argv, lambda *c: calls.append(c), glibc=True, plugin=lambda: False)
    assert not calls


def test_the_cli_re_executes_only_step_commands_of_its_own_process(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(ha, "apply", lambda: calls.append(1))
  assert cli.main(["unimo-jax", "model-info", "--help"]) == 0  # a call from Python: no
  assert not calls
  monkeypatch.setattr(sys, "argv", ["unimo-jax", "tokenizer", "--help"])
  assert cli.main() == 0  # not a step command
  assert not calls
  monkeypatch.setattr(sys, "argv", ["unimo-jax", "model-info", "--help"])
  assert cli.main() == 0
  assert calls == [1]
  monkeypatch.setattr(ha, "apply", lambda: ha.decide({ha.ENV: "x"}, glibc=True, plugin=bool))
  monkeypatch.setattr(sys, "argv", ["unimo-jax", "train", "--help"])
  assert cli.main() == 2
  assert ha.ENV in capsys.readouterr().err


# A child that re-executes itself through ``apply`` and then counts the page faults of a 256 MiB
# block allocated, written, freed and allocated again on a non-main thread (the way XLA:CPU's
# worker thread allocates a step's temporary buffer).
CHILD = textwrap.dedent("""
    import json, os, resource, threading
    import numpy as np
    from unimo_jax import host_allocator
    policy = host_allocator.apply()
    faults = []
    def work():
      for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.empty(1 << 25)  # 256 MiB
        block.fill(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    t = threading.Thread(target=work)
    t.start(); t.join()
    print(json.dumps(dict(policy=policy, faults=faults,
                          env={k: os.environ.get(k) for k in host_allocator.MAIN_HEAP},
                          describe=host_allocator.describe())))
""")


def _child(extra_env):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k not in (ha.ENV, ha.APPLIED)}
  env.update(extra_env, NUMPY_MADVISE_HUGEPAGE="0")  # 4 KiB pages, as XLA:CPU gets
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not ha.is_glibc(), reason="glibc only")
def test_the_main_heap_reuses_a_freed_block_the_system_allocator_faults_in_again():
  pages = (1 << 28) // 4096
  tuned = _child({"JAX_PLATFORMS": "cpu"})
  assert tuned["policy"] == "main_heap" and tuned["env"] == ha.MAIN_HEAP
  assert "main heap" in tuned["describe"]
  stock = _child({"JAX_PLATFORMS": "cpu", ha.ENV: "system"})
  assert stock["policy"] == "system" and stock["env"] == {k: None for k in ha.MAIN_HEAP}
  # first allocation: every page is new either way (4 KiB pages, or 2 MiB ones where the kernel
  # backs every anonymous mapping with huge pages); afterwards only the stock one faults again
  assert tuned["faults"][0] >= pages // 1024 and stock["faults"][0] >= pages // 1024
  assert all(f >= stock["faults"][0] // 2 for f in stock["faults"][1:]), stock
  assert all(f <= tuned["faults"][0] // 50 for f in tuned["faults"][1:]), tuned
