"""Every ```python block of the README and the docs pages runs, as a newcomer would paste it, with sizes made small.

Each block runs in a fresh namespace that defines the names the README leaves
to the reader (``init_train_state``, ``train_step``, ``workdir``...), over a
fresh run folder holding steps 2000, 3000 and 4000 of a small Flax
``TrainState``. Paths the README spells out (``/tmp/my_run``,
``/runs/pretrained``) are replaced by temporary folders, and the many-hosts
block's ``jax.distributed.initialize()`` by a one-process cluster on
127.0.0.1 (it runs in a process of its own).
"""

import json
import re
import socket
import subprocess
import textwrap

import pytest

from tests.helpers import PYTHON, REPO, subprocess_env

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]

PRELUDE = textwrap.dedent("""
  import dataclasses, datetime, logging, os, tempfile
  import flax, jax, jax.numpy as jnp, numpy as np, optax
  import kckpt

  root = tempfile.mkdtemp()
  workdir = w = os.path.join(root, "run")

  @flax.struct.dataclass
  class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState

  tx = optax.adam(1e-3)

  def init_train_state():
    params = {"dense": {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}}
    return TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params))

  def train_step(state, batch):
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)

  def evaluate(params):
    return float(jnp.sum(params["dense"]["w"]))

  init_state = init_train_state
  num_steps, batch, loss, step = 4002, None, 0.5, 7000
  state, new_state = init_train_state(), init_train_state()
  params, opt_state = init_train_state().params, init_train_state().opt_state
  abstract_state = jax.eval_shape(init_train_state)
  abstract_params = abstract_state.params
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1000, async_save=False) as _writer:
    for _s in (2000, 3000, 4000):
      _writer.save(init_train_state().replace(step=jnp.array(_s)), step=_s, metrics={"loss": 1000.0 / _s})
  kckpt.write_end_marker(workdir, step=4000)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1000)
""")

# Extra setup for the blocks that need another kind of run, keyed by a string of the block.
PRETRAINED = textwrap.dedent("""
  pretrained = os.path.join(root, "pretrained")
  def init_state():
    layer = lambda: {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    return {"params": {"embed": jnp.zeros((8, 2)), "encoder": {"layer_0": layer(), "layer_1": layer()},
                       "decoder": {"block_0": layer(), "block_1": layer()}}}
  with kckpt.Checkpointer(workdir=pretrained, save_interval_steps=1, async_save=False) as _writer:
    _writer.save(jax.tree.map(lambda x: x + 1, init_state()), step=1)
  ckpt = kckpt.Checkpointer(workdir=os.path.join(root, "new_run"), save_interval_steps=1000)
""")
FRESH_RUN = "ckpt = kckpt.Checkpointer(workdir=os.path.join(root, 'fresh'), save_interval_steps=1000)\n"
SETUP = {"PartialLoader(": PRETRAINED, "items.Composite(params=params, opt_state=opt_state, meta=": FRESH_RUN}
PATHS = {'"/tmp/my_run"': "workdir", '"/runs/pretrained"': "pretrained"}


def python_blocks():
  """The ```python blocks of the README, then of each page under docs/."""
  return [block for page in PAGES for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def program(blocks):
  """A Python program that runs each block after its prelude and prints one JSON result per block."""
  lines = ["import json, traceback"]
  for i, block in enumerate(blocks):
    code = PRELUDE + "".join(extra for key, extra in SETUP.items() if key in block)
    for literal, name in PATHS.items():
      block = block.replace(literal, name)
    if "jax.distributed.initialize()" in block:  # before any JAX call: ahead of the prelude
      block = block.replace("jax.distributed.initialize()", "pass  # initialized before the prelude")
      code = f'import jax\njax.distributed.initialize("127.0.0.1:{_free_port()}", num_processes=1, process_id=0)\n' + code
    lines.append(
      f"try:\n  exec(compile({code + block!r}, 'docs block {i + 1}', 'exec'), {{}})\n"
      f"  print('RESULT', json.dumps([{i}, None]), flush=True)\n"
      f"except BaseException:\n  print('RESULT', json.dumps([{i}, traceback.format_exc()]), flush=True)"
    )
  return "\n".join(lines)


@pytest.fixture(scope="module")
def results():
  blocks = python_blocks()
  distributed = [i for i, b in enumerate(blocks) if "jax.distributed.initialize()" in b]
  out: dict[int, str | None] = {}
  # The many-hosts block initializes jax.distributed: a process of its own.
  for group in ([i for i in range(len(blocks)) if i not in distributed], distributed):
    code = program([blocks[i] for i in group])
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=REPO)
    seen = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(seen) == len(group), proc.stdout[-3000:] + proc.stderr[-3000:]
    out.update({group[i]: error for i, error in seen})
  return out


def test_the_readme_has_the_blocks_this_test_knows():
  blocks = python_blocks()
  assert len(blocks) >= 10
  assert any("iter_new_checkpoints" in b for b in blocks)  # the Evaluate block
  assert all(any(key in b for b in blocks) for key in SETUP)


@pytest.mark.parametrize("index", range(len(python_blocks())), ids=lambda i: f"block{i + 1}")
def test_readme_block_runs(results, index):
  assert results[index] is None, f"python block {index + 1} (README, then docs/) failed:\n{results[index]}"
