"""Test program: a trainer that saves every step with max_to_keep=2, then writes its end marker.

Usage: python save_every_step.py WORKDIR NUM_STEPS
Each step's state is {"w": full((64, 64), step)}, so a reader can check what it restored.
"""

import sys

import jax.numpy as jnp

import kckpt


def main():
  workdir, num_steps = sys.argv[1], int(sys.argv[2])
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=2) as ckpt:
    for step in range(1, num_steps + 1):
      ckpt.save({"w": jnp.full((64, 64), float(step))}, step=step)
  kckpt.write_end_marker(workdir, step=num_steps)
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
