"""PartialLoader: warm starts from another run, with globs, ignore lists and errors that name the key."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from etils import epath

import kckpt
from kckpt import _orbax
from kckpt import items


def saved_run(workdir, state, step=1, **kwargs):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  ckpt.save(state, step=step, **kwargs)
  ckpt.wait_until_finished()
  return ckpt


def pretrained(workdir):
  params = {
    "encoder": {
      "layer_0": {"w": jnp.full((2, 3), 1.0), "b": jnp.full(3, 1.5)},
      "layer_1": {"w": jnp.full((3, 3), 2.0), "b": jnp.full(3, 2.5)},
    },
    "head": {"w": jnp.full((3, 1), 9.0)},
  }
  saved_run(workdir, {"params": params, "opt_state": optax.adam(0.1).init(params)}, step=100)
  return params


def fresh_state():
  params = {
    "encoder": {"layer_0": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "layer_1": {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}},
    "decoder": {"block_0": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "block_1": {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}},
    "head": {"w": jnp.zeros((3, 1))},
  }
  return {"params": params, "opt_state": optax.adam(0.1).init(params)}


def test_partial_loader_encoder_to_decoder_with_globs(tmp_path):
  pretrained(tmp_path / "pre")
  loader = kckpt.PartialLoader(
    workdir=tmp_path / "pre",
    new_to_old={"params.encoder": "params.encoder", "params.decoder.block_*": "params.encoder.layer_*"},
  )
  state = fresh_state()
  out = loader.transform(state)
  np.testing.assert_array_equal(out["params"]["decoder"]["block_1"]["w"], np.full((3, 3), 2.0))
  np.testing.assert_array_equal(out["params"]["encoder"]["layer_0"]["b"], np.full(3, 1.5))
  np.testing.assert_array_equal(out["params"]["head"]["w"], np.zeros((3, 1)))  # not mapped
  assert jax.tree.structure(out["opt_state"]) == jax.tree.structure(state["opt_state"])
  np.testing.assert_array_equal(out["opt_state"][0].mu["encoder"]["layer_0"]["w"], np.zeros((2, 3)))  # opt_state left alone
  assert loader.mapping(state)["params.decoder.block_0.b"] == "params.encoder.layer_0.b"


def test_partial_loader_double_star_and_ignore_lists(tmp_path):
  pretrained(tmp_path / "pre")
  loader = kckpt.PartialLoader(
    workdir=tmp_path / "pre",
    step=100,
    new_to_old={"params.**": "params.**"},
    ignore_new=["params.decoder"],
    ignore_old=["params.head"],
  )
  out = loader.transform(fresh_state())
  np.testing.assert_array_equal(out["params"]["encoder"]["layer_1"]["b"], np.full(3, 2.5))
  np.testing.assert_array_equal(out["params"]["head"]["w"], np.zeros((3, 1)))  # ignored on the source side
  np.testing.assert_array_equal(out["params"]["decoder"]["block_0"]["w"], np.zeros((2, 3)))  # ignored on the target side


def test_partial_loader_errors_name_the_key(tmp_path):
  pretrained(tmp_path / "pre")
  state = fresh_state()
  with pytest.raises(kckpt.TransplantError, match="key 'params.nothing' matches no leaf"):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.nothing": "params.encoder"}).transform(state)
  with pytest.raises(
    kckpt.TransplantError, match="key 'params.decoder': target leaf params.decoder.block_0.b maps to params.missing.block_0.b"
  ):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.decoder": "params.missing"}).transform(state)
  with pytest.raises(
    kckpt.TransplantError,
    match=r"key 'params.decoder.block_1': params.encoder.layer_0.w is \(2, 3\) float32 .*"
    r" but params.decoder.block_1.w is \(3, 3\)",
  ):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.decoder.block_1": "params.encoder.layer_0"}).transform(
      state
    )
  with pytest.raises(kckpt.TransplantError, match="same number of globs"):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.*": "params.encoder"})
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    kckpt.PartialLoader(workdir=tmp_path / "empty", new_to_old={"params": "params"}).transform(state)


def test_partial_loader_warm_starts_then_resume_is_normal(tmp_path):
  pretrained(tmp_path / "pre")
  loader = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.encoder": "params.encoder"})
  ckpt = kckpt.Checkpointer(workdir=tmp_path / "new", save_interval_steps=1)

  def start():
    state = fresh_state()
    return loader.transform(state) if ckpt.latest_step is None else ckpt.restore(state)

  state = start()
  np.testing.assert_array_equal(state["params"]["encoder"]["layer_0"]["w"], np.ones((2, 3)))
  state["params"]["head"]["w"] = jnp.full((3, 1), 4.0)  # "training"
  ckpt.save(state, step=1)
  ckpt.wait_until_finished()
  resumed = start()
  np.testing.assert_array_equal(resumed["params"]["head"]["w"], np.full((3, 1), 4.0))


def test_partial_loader_reads_only_the_mapped_item(tmp_path):
  params = {"w": jnp.ones(3)}
  saved_run(tmp_path / "pre", items.Composite(params=params, opt_state=optax.sgd(0.1).init(params)))
  import shutil

  shutil.rmtree(tmp_path / "pre" / "checkpoints" / "ckpt_1" / "opt_state")
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", item="params", new_to_old={"w": "w"}).transform({"w": jnp.zeros(3)})
  np.testing.assert_array_equal(out["w"], np.ones(3))


def test_partial_loader_takes_every_step_name(tmp_path):
  params = {"w": jnp.zeros(2)}
  with kckpt.Checkpointer(
    workdir=tmp_path / "pre", save_interval_steps=1, max_to_keep=None, best_metric_path="loss", best_mode="min", async_save=False
  ) as ckpt:
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.9)):
      ckpt.save(
        {"params": {"w": jnp.full(2, float(step))}}, step=step, metrics={"loss": loss}, tag="first" if step == 1 else None
      )
  for step, expected in ((-1, 3.0), ("latest", 3.0), ("best", 2.0), ("first", 1.0), (2, 2.0)):
    loader = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params"}, step=step)
    np.testing.assert_array_equal(loader.transform({"params": params})["params"]["w"], np.full(2, expected))
  with pytest.raises(kckpt.CheckpointNotFoundError, match="tag 'nope'"):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params"}, step="nope").transform({"params": params})


def escaped_items_of(workdir, step=1):
  step_path = workdir / "checkpoints" / f"ckpt_{step}"
  return _orbax.escaped_items(_orbax.read_step_metadata(step_path))


def test_a_source_saved_with_escaped_keys_loads_by_its_real_key_paths(tmp_path):
  source = {
    "params": {
      "a.b": jnp.full(2, 1.0),
      "a": {"b": jnp.full(2, 2.0), "c": jnp.full(3, 3.0)},
      "layer.0.w": jnp.full(4, 4.0),
    }
  }
  saved_run(tmp_path / "pre", source)
  assert escaped_items_of(tmp_path / "pre") == {"default"}  # a.b twice: saved with escaped keys
  # The same tree: every leaf gets its own value, the two "params.a.b" included.
  target = {"params": {"a.b": jnp.zeros(2), "a": {"b": jnp.zeros(2), "c": jnp.zeros(3)}, "layer.0.w": jnp.zeros(4)}}
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params"}).transform(target)
  np.testing.assert_array_equal(out["params"]["a.b"], np.full(2, 1.0))
  np.testing.assert_array_equal(out["params"]["a"]["b"], np.full(2, 2.0))
  np.testing.assert_array_equal(out["params"]["a"]["c"], np.full(3, 3.0))
  np.testing.assert_array_equal(out["params"]["layer.0.w"], np.full(4, 4.0))
  # Globs match real keys: params.a.* is the subtree a, not the key "a.b".
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"enc.*": "params.a.*"}).transform(
    {"enc": {"b": jnp.zeros(2), "c": jnp.zeros(3)}}
  )
  np.testing.assert_array_equal(out["enc"]["b"], np.full(2, 2.0))
  np.testing.assert_array_equal(out["enc"]["c"], np.full(3, 3.0))
  # Where two leaves share a dotted path, "a.b" is the nested one and a\.b the key with the dot;
  # a dotted path only one leaf has needs no escape.
  loader = kckpt.PartialLoader(
    workdir=tmp_path / "pre", new_to_old={"x": r"params.a\.b", "y": "params.a.b", "z": "params.layer.0.w"}
  )
  flat = {"x": jnp.zeros(2), "y": jnp.zeros(2), "z": jnp.zeros(4)}
  assert loader.mapping(flat) == {"x": r"params.a\.b", "y": "params.a.b", "z": "params.layer.0.w"}
  out = loader.transform(flat)
  np.testing.assert_array_equal(out["x"], np.full(2, 1.0))
  np.testing.assert_array_equal(out["y"], np.full(2, 2.0))
  np.testing.assert_array_equal(out["z"], np.full(4, 4.0))
  # ignore_old names real paths too.
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params"}, ignore_old=[r"params.a\.b"]).transform(
    target
  )
  np.testing.assert_array_equal(out["params"]["a.b"], np.zeros(2))
  np.testing.assert_array_equal(out["params"]["a"]["b"], np.full(2, 2.0))


def test_a_name_two_escaped_source_leaves_share_is_an_error_naming_both(tmp_path):
  saved_run(tmp_path / "pre", {"p": {"a.b": {"c": jnp.ones(1)}, "a": {"b.c": jnp.zeros(1)}}})
  assert escaped_items_of(tmp_path / "pre") == {"default"}
  with pytest.raises(kckpt.TransplantError, match=r"p\.a\.b\\\.c and p\.a\\\.b\.c"):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"x": "p.a.b.c"}).transform({"x": jnp.zeros(1)})
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"x": r"p.a\.b.c"}).transform({"x": jnp.zeros(1)})
  np.testing.assert_array_equal(out["x"], np.ones(1))


def test_a_state_whose_dotted_paths_collide_loads_each_leaf_by_its_real_path(tmp_path):
  saved_run(tmp_path / "pre", {"params": {"w": jnp.ones(2)}, "v": jnp.full(1, 5.0)})
  state = {"params": {"w": jnp.zeros(2)}, "a.b": jnp.zeros(1), "a": {"b": jnp.zeros(1)}}
  loader = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params", r"a\.b": "v"})
  assert loader.mapping(state) == {"params.w": "params.w", r"a\.b": "v"}
  out = loader.transform(state)
  np.testing.assert_array_equal(out["params"]["w"], np.ones(2))
  np.testing.assert_array_equal(out["a.b"], np.full(1, 5.0))
  np.testing.assert_array_equal(out["a"]["b"], np.zeros(1))  # "a.b" in the state names only one leaf, not mapped here


def test_one_source_leaf_is_never_loaded_into_two_target_leaves_sharing_its_dotted_path(tmp_path):
  # Before: the target's key "a.b" (escaped a\.b) fell back to the source's nested a.b, which
  # also filled the target's nested a.b: one saved value silently in two leaves.
  saved_run(tmp_path / "pre", {"params": {"a": {"b": jnp.ones(1)}}})
  state = {"params": {"a.b": jnp.zeros(1), "a": {"b": jnp.zeros(1)}}}
  loader = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params": "params"})
  with pytest.raises(
    kckpt.TransplantError, match=r"target leaves params\.a\.b and params\.a\\\.b share the dotted path params\.a\.b"
  ):
    loader.transform(state)
  # Naming the one meant works (the nested leaf: its name matches exactly).
  out = kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"params.a.b": "params.a.b"}).transform(state)
  np.testing.assert_array_equal(out["params"]["a"]["b"], np.ones(1))
  np.testing.assert_array_equal(out["params"]["a.b"], np.zeros(1))


# -- A .safetensors file as the source ----------------------------------------------


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="out")(nn.relu(nn.Dense(4, name="hidden")(x)))


def hf_style_file(path, dtype=np.float32):
  """Weights named the Hugging Face way, written by the safetensors library (kernels already (in, out))."""
  rng = np.random.default_rng(0)
  weights = {
    "model.hidden.kernel": rng.normal(size=(3, 4)).astype(dtype),
    "model.hidden.bias": rng.normal(size=4).astype(dtype),
    "model.out.kernel": rng.normal(size=(4, 2)).astype(dtype),
    "model.out.bias": rng.normal(size=2).astype(dtype),
    "lm_head.weight": rng.normal(size=(2, 9)).astype(dtype),
  }
  safetensors.numpy.save_file(weights, str(path))
  return weights


def test_partial_loader_warm_starts_flax_linen_params_from_a_safetensors_file(tmp_path):
  weights = hf_style_file(tmp_path / "model.safetensors")
  params = Mlp().init(jax.random.key(1), jnp.zeros((1, 3)))["params"]
  loader = kckpt.PartialLoader(workdir=str(tmp_path / "model.safetensors"), new_to_old={"*": "model.*"}, ignore_new=["out.bias"])
  assert loader.mapping(params) == {
    "hidden.bias": "model.hidden.bias",
    "hidden.kernel": "model.hidden.kernel",
    "out.kernel": "model.out.kernel",
  }
  out = loader.transform(params)
  np.testing.assert_array_equal(out["hidden"]["kernel"], weights["model.hidden.kernel"])
  np.testing.assert_array_equal(out["out"]["kernel"], weights["model.out.kernel"])
  np.testing.assert_array_equal(out["out"]["bias"], params["out"]["bias"])  # ignored
  assert isinstance(out["hidden"]["bias"], jax.Array) and out["hidden"]["bias"].sharding == params["hidden"]["bias"].sharding
  # The model runs on the loaded weights.
  assert Mlp().apply({"params": out}, jnp.ones((1, 3))).shape == (1, 2)


def test_partial_loader_warm_starts_an_nnx_model_from_bfloat16_weights(tmp_path):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  weights = hf_style_file(tmp_path / "model.safetensors", dtype=jnp.bfloat16)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 4, rngs=rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

  model = Model(nnx.Rngs(0))
  loader = kckpt.PartialLoader(workdir=epath.Path(tmp_path / "model.safetensors"), new_to_old={"*.*.value": "model.*.*"})
  nnx.update(model, loader.transform(nnx.state(model, nnx.Param)))
  assert model.out.kernel[...].dtype == jnp.float32  # bfloat16 in the file, cast to the model's dtype
  np.testing.assert_array_equal(model.out.kernel[...], weights["model.out.kernel"].astype(np.float32))
  np.testing.assert_array_equal(model.hidden.bias[...], weights["model.hidden.bias"].astype(np.float32))


def test_partial_loader_from_a_safetensors_file_names_the_leaf_at_fault(tmp_path):
  path = tmp_path / "model.safetensors"
  hf_style_file(path)
  params = Mlp().init(jax.random.key(1), jnp.zeros((1, 3)))["params"]
  with pytest.raises(kckpt.TransplantError, match=r"out.kernel maps to model.out.weight, which is not in the file .*model"):
    kckpt.PartialLoader(workdir=path, new_to_old={"out.kernel": "model.out.weight"}).transform(params)
  with pytest.raises(
    kckpt.TransplantError, match=r"key 'out.kernel': lm_head.weight is \(2, 9\) float32 in the file but out.kernel is \(4, 2\)"
  ):
    kckpt.PartialLoader(workdir=path, new_to_old={"out.kernel": "lm_head.weight"}).transform(params)
  safetensors.numpy.save_file({"ids": np.zeros((4, 2), np.int32)}, str(tmp_path / "ints.safetensors"))
  with pytest.raises(kckpt.TransplantError, match=r"ids is \(4, 2\) int32 in the file but out.kernel is \(4, 2\) float32"):
    kckpt.PartialLoader(workdir=tmp_path / "ints.safetensors", new_to_old={"out.kernel": "ids"}).transform(params)
  with pytest.raises(kckpt.TransplantError, match="has no steps or items"):
    kckpt.PartialLoader(workdir=path, new_to_old={"*": "model.*"}, step=3).transform(params)
  with pytest.raises(kckpt.CheckpointNotFoundError, match="no such file"):
    kckpt.PartialLoader(workdir=tmp_path / "nope.safetensors", new_to_old={"*": "model.*"}).transform(params)
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(kckpt.TransplantError, match="junk.safetensors is not a safetensors file"):
    kckpt.PartialLoader(workdir=tmp_path / "junk.safetensors", new_to_old={"*": "model.*"}).transform(params)


def test_a_checkpoint_leaf_whose_dtype_cannot_be_cast_is_refused_by_name(tmp_path):
  saved_run(tmp_path / "pre", {"ids": jnp.zeros(3, jnp.int32)})
  with pytest.raises(kckpt.TransplantError, match=r"ids is \(3,\) int32 in the checkpoint but w is \(3,\) float32"):
    kckpt.PartialLoader(workdir=tmp_path / "pre", new_to_old={"w": "ids"}).transform({"w": jnp.zeros(3)})
