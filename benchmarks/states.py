"""Realistic train states for the benchmarks: parameters plus Adam's moments, with values as in a trained model.

Three layouts, as nested dicts of arrays on the first local device:

- ``gpt2``: a GPT-2-small-shaped state: token and position embeddings, 12
  blocks (attention, MLP, two LayerNorms), the final LayerNorm, and Adam's two
  moments of each (444 array leaves plus the step count, 1.49 GB float32);
- ``deep``: a deep model of many small parameter leaves (4 to 256 KB each,
  like a deep NNX model), with Adam's moments: ``deep_leaves`` parameter
  leaves, three times as many array leaves in all;
- ``mixed``: the GPT-2 shapes with bfloat16 parameters and a float32
  optimizer state (mixed-precision training).

Values are drawn as in a trained model: weights ~ N(0, 0.02), LayerNorm scales
near 1, Adam's first moment ~ N(0, 1e-3), second moment |N(0, 1e-6)|. They
must not be constant: a constant optimizer state compresses to nothing and
favours compressed formats unfairly.

>>> state = make("gpt2", scale=0.01)
>>> sorted(state)
['opt_state', 'params']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STATES = ("gpt2", "deep", "mixed")


def gpt2_shapes(vocab: int = 50257, context: int = 1024, width: int = 768, blocks: int = 12) -> dict[str, tuple[int, ...]]:
  """Dotted parameter name -> shape, GPT-2 small by default."""
  shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, width), "wpe": (context, width)}
  for b in range(blocks):
    p = f"h{b:02d}"
    shapes |= {
      f"{p}.ln_1.scale": (width,),
      f"{p}.ln_1.bias": (width,),
      f"{p}.attn.c_attn.kernel": (width, 3 * width),
      f"{p}.attn.c_attn.bias": (3 * width,),
      f"{p}.attn.c_proj.kernel": (width, width),
      f"{p}.attn.c_proj.bias": (width,),
      f"{p}.ln_2.scale": (width,),
      f"{p}.ln_2.bias": (width,),
      f"{p}.mlp.c_fc.kernel": (width, 4 * width),
      f"{p}.mlp.c_fc.bias": (4 * width,),
      f"{p}.mlp.c_proj.kernel": (4 * width, width),
      f"{p}.mlp.c_proj.bias": (width,),
    }
  shapes |= {"ln_f.scale": (width,), "ln_f.bias": (width,)}
  return shapes


def deep_shapes(leaves: int, seed: int = 1) -> dict[str, tuple[int, ...]]:
  """`leaves` parameter leaves of 1024 to 65536 float32 elements (4 to 256 KB), in blocks of 8 per layer."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1024, 64 * 1024, leaves)
  return {f"layer_{i // 8:04d}.p{i % 8}": (int(n),) for i, n in enumerate(sizes)}


def _nested(shapes: dict[str, tuple[int, ...]], leaf: Any) -> dict[str, Any]:
  """A nested dict with ``leaf(name, shape)`` at each dotted name of `shapes`."""
  out: dict[str, Any] = {}
  for name, shape in shapes.items():
    node = out
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf(name, shape)
  return out


def train_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, param_dtype: Any = np.float32) -> dict[str, Any]:
  """``{"params": ..., "opt_state": {"mu": ..., "nu": ..., "count": ...}}``; moments in float32."""
  rng = np.random.default_rng(seed)

  def tree(draw, dtype):
    return _nested(shapes, lambda name, shape: jax.device_put(draw(name, shape).astype(dtype)))

  def param(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith(".scale"):
      return 1 + 0.05 * rng.standard_normal(shape, np.float32)
    return 0.02 * rng.standard_normal(shape, np.float32)

  return {
    "params": tree(param, param_dtype),
    "opt_state": {
      "mu": tree(lambda _, shape: 1e-3 * rng.standard_normal(shape, np.float32), np.float32),
      "nu": tree(lambda _, shape: np.abs(1e-6 * rng.standard_normal(shape, np.float32)), np.float32),
      "count": jnp.asarray(1000, jnp.int32),
    },
  }


def zeros(name: str, *, scale: float = 1.0, deep_leaves: int = 3000) -> dict[str, Any]:
  """A state of zeros with the structure, shapes and dtypes of `make(name)`: a restore target, built in no time."""
  shapes = shapes_of(name, scale=scale, deep_leaves=deep_leaves)
  param_dtype = jnp.bfloat16 if name == "mixed" else jnp.float32
  return {
    "params": _nested(shapes, lambda _, shape: jnp.zeros(shape, param_dtype)),
    "opt_state": {
      "mu": _nested(shapes, lambda _, shape: jnp.zeros(shape, jnp.float32)),
      "nu": _nested(shapes, lambda _, shape: jnp.zeros(shape, jnp.float32)),
      "count": jnp.asarray(0, jnp.int32),
    },
  }


def shapes_of(name: str, *, scale: float = 1.0, deep_leaves: int = 3000) -> dict[str, tuple[int, ...]]:
  """The parameter shapes of state `name`; `scale` < 1 shrinks the GPT-2 vocabulary, context and width (smoke runs)."""
  if name == "deep":
    return deep_shapes(max(8, int(deep_leaves * scale)))
  if name in ("gpt2", "mixed"):
    if scale == 1.0:
      return gpt2_shapes()
    width = max(8, int(768 * scale) // 8 * 8)
    return gpt2_shapes(vocab=max(16, int(50257 * scale)), context=max(8, int(1024 * scale)), width=width)
  raise ValueError(f"Unknown state {name!r}: one of {STATES}.")


def make(name: str, *, scale: float = 1.0, deep_leaves: int = 3000, seed: int = 0) -> dict[str, Any]:
  """The train state `name` (one of `STATES`)."""
  dtype = jnp.bfloat16 if name == "mixed" else np.float32
  return train_state(shapes_of(name, scale=scale, deep_leaves=deep_leaves), seed=seed, param_dtype=dtype)


def describe(state: Any) -> str:
  """``"444 leaves, 1.49 GB"``."""
  leaves = jax.tree.leaves(state)
  return f"{len(leaves)} leaves, {sum(x.nbytes for x in leaves) / 1e9:.2f} GB"
