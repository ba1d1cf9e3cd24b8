"""What checksums cost: restores and saves of realistic train states, `StorageOptions()` against `checksums=False`.

Realistic states, values drawn as in a trained model (weights ~ N(0, 0.02), Adam's
first moment ~ N(0, 1e-3), second moment |N(0, 1e-6)|, LayerNorm scales
near 1), float32 arrays on the CPU device:

- **gpt2**: a GPT-2-small-shaped train state: token and position
  embeddings, 12 blocks (attention, MLP, two LayerNorms), the final
  LayerNorm, and Adam's two moments of each (about 1.49 GB, 444 leaves);
- **deep**: a deep model of many small parameter leaves (4 to 256 KB each)
  with Adam's moments (``--deep-leaves`` parameter leaves, times 3);
- **mixed**: the GPT-2 state with bfloat16 parameters and float32 moments.

Each state is saved with each `StorageOptions` in rounds, alternating the two
(and which goes first): a sync save until durable, and an async save (how long
it blocks the caller). The last step saved with checksums is then restored
into zero targets again and again, with its checks and without them
(`unchecked`: read as a step saved without checksums is), alternated the same
way, from the page cache (warm) and after its files were dropped from it
(cold, ``posix_fadvise DONTNEED``). Both arms read the same files, so where
the files lie on the disk is no difference between them.
Reported: medians of the wall time, of the CPU time the process spent
(all threads) and of its user part, and the median of each round's on/off
ratio (the two of a round run back to back, so the machine's drift over the
run cancels), with the ratios' mean and its standard error. On a
shared machine the CPU time is the steadier measure of the work checksums add;
the extra CPU time of a checked restore is split between kckpt's background
thread (the hash of the shards over 1 MiB) and the other threads (Linux).

    python -m benchmarks.checksums [--states gpt2 deep] [--repeats 5] [--cold-repeats 3] [--save-repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import kckpt
from benchmarks import states
from benchmarks.pagecache import evict

# Per restore: its time, the process's CPU time, its user part, and the CPU time of kckpt's background thread.
MEASURES = ("", " cpu", " user", " hash")
OPTIONS = {"checksums": kckpt.StorageOptions(), "no checksums": kckpt.StorageOptions(checksums=False)}


def _cpu_seconds() -> tuple[float, float]:
  """CPU time of this process, all threads (TensorStore's included): user and system + user."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_utime + usage.ru_stime


def _background_cpu_seconds() -> float:
  """CPU time (user and system) of kckpt's background thread, which hashes the large shards (0 if not started).

  Linux only (``/proc/self/task``); 0 elsewhere. The rest of a checked
  restore's extra CPU time is what the checks cost the other threads.
  """
  for thread in threading.enumerate():
    if thread.name.startswith("kckpt-background") and thread.native_id is not None:
      try:
        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
      except OSError:
        return 0.0
      return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  return 0.0


@contextlib.contextmanager
def unchecked():
  """kckpt's reads take the steps read inside for steps saved without checksums: nothing is checked.

  Benchmark only: it patches kckpt's internal loader of a step's checksum
  table (None is what a step without checksums gives).
  """
  from kckpt._orbax import _read_checks  # pylint: disable=import-outside-toplevel

  load = _read_checks._load  # pylint: disable=protected-access
  _read_checks._load = lambda step_dir: None  # pylint: disable=protected-access
  try:
    yield
  finally:
    _read_checks._load = load  # pylint: disable=protected-access


def measure(name: str, state: Any, root: Path, *, repeats: int, cold_repeats: int, save_repeats: int) -> dict[str, Any]:
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  leaves = len(jax.tree.leaves(state))
  target = jax.tree.map(jnp.zeros_like, state)
  got: dict[str, dict[str, list[float]]] = {
    k: {"save": [], "async_blocked": [], **{f"{kind}{what}": [] for kind in ("warm", "cold") for what in MEASURES}}
    for k in OPTIONS
  }
  ckpts = {
    label: kckpt.Checkpointer(
      workdir=root / f"{name}_{label.replace(' ', '_')}", save_interval_steps=1, max_to_keep=1, async_save=False, storage=storage
    )
    for label, storage in OPTIONS.items()
  }
  for i in range(save_repeats):  # alternated like the restores; each save is a new step (the older one deleted)
    order = list(OPTIONS) if i % 2 == 0 else list(OPTIONS)[::-1]
    for label in order:
      start = time.perf_counter()
      ckpts[label].save(state, step=2 * i + 1)
      got[label]["save"].append(time.perf_counter() - start)
      async_workdir = root / f"{name}_{label.replace(' ', '_')}_async{i}"
      with kckpt.Checkpointer(workdir=async_workdir, save_interval_steps=1, storage=OPTIONS[label]) as async_ckpt:
        start = time.perf_counter()
        async_ckpt.save(state, step=1)
        got[label]["async_blocked"].append(time.perf_counter() - start)
      shutil.rmtree(async_workdir)
  step = 2 * save_repeats - 1
  for kind, count in (("warm", repeats), ("cold", cold_repeats)):
    for i in range(count + 1):  # the first round warms up (compilation, page cache), untimed
      order = list(OPTIONS) if i % 2 == 0 else list(OPTIONS)[::-1]
      for label in order:
        ckpt = ckpts["checksums"]  # both arms read the same step
        if kind == "cold":
          evict(Path(ckpt.directory))
        with unchecked() if label == "no checksums" else contextlib.nullcontext():
          hash_start = _background_cpu_seconds()
          start, (user_start, cpu_start) = time.perf_counter(), _cpu_seconds()
          restored = ckpt.restore(target, step=step)
          jax.block_until_ready(restored)
          wall, (user_end, cpu_end) = time.perf_counter() - start, _cpu_seconds()
          hash_seconds = _background_cpu_seconds() - hash_start
        if i:
          got[label][kind].append(wall)
          got[label][f"{kind} cpu"].append(cpu_end - cpu_start)
          got[label][f"{kind} user"].append(user_end - user_start)
          got[label][f"{kind} hash"].append(hash_seconds)
        del restored
  for c in ckpts.values():
    c.close()
  out: dict[str, Any] = {"state": name, "bytes": nbytes, "leaves": leaves}
  for label in OPTIONS:
    out[label] = {k: statistics.median(v) for k, v in got[label].items() if v}
    out[label]["runs"] = got[label]
  # The median of each round's on/off ratio: the two ran back to back, so the
  # machine's drift over the run cancels.
  ratios = {
    k: [a / b for a, b in zip(v, got["no checksums"][k], strict=True)]
    for k, v in got["checksums"].items()
    if v and not k.endswith(" hash")
  }
  out["ratio"] = {k: statistics.median(r) for k, r in ratios.items()}
  # The spread of the paired ratios: their mean and its standard error (none from one round).
  out["ratio_mean"] = {k: statistics.mean(r) for k, r in ratios.items()}
  out["ratio_se"] = {k: statistics.stdev(r) / len(r) ** 0.5 for k, r in ratios.items() if len(r) > 1}
  # Where a checked restore's extra CPU time went, per round: kckpt's background thread (the hash of the
  # large shards) and every other thread (the small shards' hash, the lookups, the awaits).
  on, off = got["checksums"], got["no checksums"]
  out["extra cpu"] = {
    kind: {
      "hash thread": statistics.median(a - b for a, b in zip(on[f"{kind} hash"], off[f"{kind} hash"], strict=True)),
      "other threads": statistics.median(
        (a - ah) - (b - bh)
        for a, ah, b, bh in zip(on[f"{kind} cpu"], on[f"{kind} hash"], off[f"{kind} cpu"], off[f"{kind} hash"], strict=True)
      ),
    }
    for kind in ("warm", "cold")
    if on[kind]
  }
  return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--states", nargs="+", choices=list(states.STATES), default=["gpt2", "deep"])
  parser.add_argument("--deep-leaves", type=int, default=1500)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cold-repeats", type=int, default=3)
  parser.add_argument("--save-repeats", type=int, default=3)
  parser.add_argument("--json", type=Path, default=None)
  args = parser.parse_args(argv)
  root = Path(tempfile.mkdtemp(prefix="kckpt_bench_checksums_"))
  results = []
  try:
    for name in args.states:
      state = states.make(name, deep_leaves=args.deep_leaves)
      counts = {"repeats": args.repeats, "cold_repeats": args.cold_repeats, "save_repeats": args.save_repeats}
      results.append(measure(name, state, root, **counts))
      del state
      r = results[-1]
      print(f"{name}: {r['leaves']} leaves, {r['bytes'] / 1e9:.2f} GB")
      print(f"  {'':14s} {'checksums':>10s} {'none':>10s} {'on/off':>7s} {'mean ± SE':>14s}")
      for key, what in (
        ("warm", "restore warm"),
        ("cold", "restore cold"),
        ("warm cpu", "  CPU s, warm"),
        ("cold cpu", "  CPU s, cold"),
        ("warm user", "  user s, warm"),
        ("cold user", "  user s, cold"),
        ("save", "save (sync)"),
        ("async_blocked", "async blocks"),
      ):
        if key in r["ratio"]:  # none with --cold-repeats 0
          se = f" ± {r['ratio_se'][key]:.3f}" if key in r["ratio_se"] else ""
          spread = f"{r['ratio_mean'][key]:.3f}{se}"
          print(f"  {what:14s} {r['checksums'][key]:9.3f}s {r['no checksums'][key]:9.3f}s {r['ratio'][key]:6.2f}x {spread:>14s}")
      for kind, extra in r["extra cpu"].items():
        print(
          f"  extra CPU of a checked restore, {kind}: {extra['hash thread']:.3f}s on the hash thread,"
          f" {extra['other threads']:+.3f}s on the others (medians of the rounds)"
        )
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if args.json:
    args.json.write_text(json.dumps(results, indent=2))
  return results


if __name__ == "__main__":
  main()
