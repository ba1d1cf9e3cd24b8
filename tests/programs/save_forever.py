"""Test program: saves step 1, then keeps saving a large state until killed.

Usage: python save_forever.py WORKDIR MEGABYTES {async,sync}
Prints "SAVED 1" once step 1 is durable, "SAVING n" as each later save starts and, as
`save()` returns: "SAVED n" (sync: step n is durable) or "STARTED n" (async: step n is
being written in the background, and step n - 1 is durable: `save(n)` first waits for it).
"""

import sys

import jax.numpy as jnp

import kckpt


def state_for(step, megabytes):
  n = megabytes * 1024 * 1024 // 4 // 4
  return {f"w{i}": jnp.full((n,), float(step * 10 + i), jnp.float32) for i in range(4)}


def main():
  workdir, megabytes, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None, async_save=mode == "async")
  ckpt.save(state_for(1, 1), step=1)
  ckpt.wait_until_finished()
  print("SAVED 1", flush=True)
  step = 2
  while True:
    print(f"SAVING {step}", flush=True)
    ckpt.save(state_for(step, megabytes), step=step)
    print(f"{'STARTED' if mode == 'async' else 'SAVED'} {step}", flush=True)
    step += 1


if __name__ == "__main__":
  main()
