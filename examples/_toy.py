"""The toy problem shared by the examples: a tiny MLP regressing a fixed function.

`train_and_resume.py` trains it and `eval_job.py` evaluates its checkpoints;
both take the model, the data and the checkpoint layout from here, so they
always agree on the structure of what is saved.

A checkpoint step holds a `kckpt.items.Composite` with four items:

* ``params``: the MLP's parameters (what the eval job restores, alone);
* ``opt_state``: the Adam state;
* ``step``: the number of updates done;
* ``data``: the `DataStream`'s position (the NumPy generator state and the
  batches drawn, as JSON) in a `kckpt.items.DataIterator`, so that a resumed
  run draws exactly the batches the killed run would have.
"""

from __future__ import annotations

import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kckpt

IN_DIM = 8
HIDDEN = 32
BATCH_SIZE = 64
EVAL_SIZE = 512
LEARNING_RATE = 1e-2
NOISE = 0.05
TEACHER_SEED = 1234
EVAL_SEED = 5678


class MLP(nn.Module):
  """Two dense layers with a tanh in between: ``IN_DIM -> HIDDEN -> 1``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.tanh(nn.Dense(HIDDEN)(x))
    return nn.Dense(1)(x)


MODEL = MLP()
OPTIMIZER = optax.adam(LEARNING_RATE)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _teacher_weights() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(TEACHER_SEED)
  a = rng.standard_normal((IN_DIM,), dtype=np.float32) / np.sqrt(IN_DIM, dtype=np.float32)
  b = rng.standard_normal((IN_DIM,), dtype=np.float32) / np.sqrt(IN_DIM, dtype=np.float32)
  return a, b


_TEACHER_A, _TEACHER_B = _teacher_weights()


def teacher(x: np.ndarray) -> np.ndarray:
  """The function to learn: ``sin(2 x.a) + 0.5 (x.b)^2``, shape ``(n, 1)``."""
  y = np.sin(2 * x @ _TEACHER_A) + 0.5 * (x @ _TEACHER_B) ** 2
  return y[:, None].astype(np.float32)


class DataStream:
  """Endless training batches drawn from a seeded NumPy generator.

  A stateful iterator with ``get_state()`` / ``set_state()``, as grain's
  iterators have: a checkpoint holds it as a `kckpt.items.DataIterator` (the
  generator's state and the number of batches drawn, as JSON, one per
  process), and restoring sets a fresh stream to continue exactly where the
  saved one was.

  >>> s = DataStream(seed=0)
  >>> _ = s.next_batch()
  >>> t = DataStream(seed=0)
  >>> t.set_state(s.get_state())
  >>> bool((s.next_batch()[0] == t.next_batch()[0]).all()), t.position
  (True, 2)
  """

  def __init__(self, seed: int):
    self.seed = seed
    self.position = 0
    self._rng = np.random.default_rng(seed)

  def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
    """One batch ``(x, y)`` of float32 arrays; advances the stream."""
    x = self._rng.standard_normal((BATCH_SIZE, IN_DIM), dtype=np.float32)
    noise = self._rng.standard_normal((BATCH_SIZE, 1), dtype=np.float32)
    self.position += 1
    return x, teacher(x) + NOISE * noise

  def get_state(self) -> dict[str, Any]:
    # `bit_generator.state` is a fresh dict of Python ints: safe to hand to an
    # async save while the stream keeps drawing.
    return {"seed": self.seed, "position": self.position, "rng_state": self._rng.bit_generator.state}

  def set_state(self, state: dict[str, Any]) -> None:
    self.seed, self.position = state["seed"], state["position"]
    self._rng = np.random.default_rng(self.seed)
    self._rng.bit_generator.state = state["rng_state"]


def eval_set() -> tuple[np.ndarray, np.ndarray]:
  """The fixed evaluation set (noise-free), the same in every process."""
  x = np.random.default_rng(EVAL_SEED).standard_normal((EVAL_SIZE, IN_DIM), dtype=np.float32)
  return x, teacher(x)


# ---------------------------------------------------------------------------
# Model and training step
# ---------------------------------------------------------------------------


def init_params(seed: int) -> Any:
  """The initial parameters for `seed`."""
  return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, IN_DIM), jnp.float32))["params"]


@jax.jit
def _init_params_and_opt_state(seed: jax.Array) -> tuple[Any, Any]:
  # One compiled program: run eagerly, the initializers compile ~20 small ones.
  params = init_params(seed)
  return params, OPTIMIZER.init(params)


def abstract_params() -> Any:
  """The parameters' shapes and dtypes (`jax.ShapeDtypeStruct`), computing nothing."""
  return jax.eval_shape(init_params, 0)


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of the model on ``(x, y)``."""
  pred = MODEL.apply({"params": params}, x)
  return jnp.mean((pred - y) ** 2)


# No buffer donation: an async save may still be copying the previous arrays.
@jax.jit
def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
  """One Adam step; returns the new params, the new optimizer state and the batch loss."""
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


eval_loss = jax.jit(loss_fn)


# ---------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------


def make_state(params: Any, opt_state: Any, step: int, data: DataStream) -> kckpt.items.Composite:
  """The train state as saved in each checkpoint step."""
  return kckpt.items.Composite(
    params=params, opt_state=opt_state, step=np.asarray(step, np.int32), data=kckpt.items.DataIterator(data)
  )


def initial_state(seed: int) -> kckpt.items.Composite:
  """The state before the first step (also the restore target of a resume)."""
  params, opt_state = _init_params_and_opt_state(np.uint32(seed))
  # Committed to the device, like the arrays a restore returns: a fresh run and
  # a resumed one then run the very same compiled programs (the placement is
  # part of what jit compiles for).
  params, opt_state = jax.device_put((params, opt_state), jax.local_devices()[0])
  return make_state(params, opt_state, 0, DataStream(seed))


def eval_target() -> kckpt.items.Composite:
  """The restore target of an eval job: only the ``params`` item is read."""
  return kckpt.items.Composite(params=abstract_params())


def params_digest(params: Any) -> str:
  """SHA-256 of every parameter's bytes: equal digests mean bit-identical params."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()
