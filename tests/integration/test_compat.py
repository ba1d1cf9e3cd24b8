"""kckpt opens runs written the Kauldron way with plain Orbax, and the reverse."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import kckpt
from kckpt import items


def kauldron_style_manager(directory, **options):
  """What Kauldron's Checkpointer builds: a manager with step_prefix='ckpt'."""
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(step_prefix="ckpt", create=True, enable_async_checkpointing=False, **options),
  )


def test_kckpt_reads_a_kauldron_workdir(tmp_path):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(10)}
  with kauldron_style_manager(tmp_path / "checkpoints", best_fn=lambda m: m["acc"]) as mngr:
    mngr.save(10, args=ocp.args.StandardSave(state), metrics={"acc": 0.5})
    mngr.save(20, args=ocp.args.StandardSave(state), metrics={"acc": 0.7})
  # Kauldron's TopLevelCheckpointItem style: named items beside `default`.
  with kauldron_style_manager(tmp_path / "checkpoints") as mngr:
    mngr.save(30, args=ocp.args.Composite(default=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"epoch": 2})))
  ckpt = kckpt.Checkpointer.open(tmp_path)
  assert ckpt.all_steps == [10, 20, 30]
  assert ckpt.metrics(10) == {"acc": 0.5}
  restored = ckpt.restore({"params": {"w": jnp.zeros((2, 3))}, "step": jnp.asarray(0)}, step=10)
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3))
  assert ckpt.restore(items.Composite(meta=None)).meta == {"epoch": 2}


def test_orbax_reads_a_kckpt_workdir(tmp_path):
  state = {"params": {"w": jnp.arange(4.0)}}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(state, step=3, metrics={"loss": 1.5})
  with kauldron_style_manager(tmp_path / "checkpoints") as mngr:
    assert mngr.all_steps() == [3]
    restored = mngr.restore(3, args=ocp.args.StandardRestore({"params": {"w": jnp.zeros(4)}}))
    assert mngr.metrics(3) == {"loss": 1.5}
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))
