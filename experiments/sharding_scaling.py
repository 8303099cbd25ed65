"""Images per second of the feature-statistics pass on 1, 2, 4, ... devices of one process.

Every device count runs on a mesh over the first devices of the same process, the 1-device
mesh (the plain single-device path) is the baseline, and each result is checked against it.
By default the devices are simulated CPU devices (``--simulate 8``): they share the machine's
cores, so the figures check that nothing serialises the devices, not that they speed it up.
On an accelerator, pass ``--simulate 0`` to use its devices.

    python -m experiments.sharding_scaling [--simulate 8] [--devices 1,2,4,8] [--width 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

import zipjax
from zipjax import models


def measure(device_counts: Sequence[int], *, width: float = 1.0, image_size: int = 32,
            batch_size: int = 128, num_batches: int = 4, repeats: int = 3,
            seed: int = 0) -> list[dict[str, Any]]:
  """One row per device count: images/s of ``zipjax.compute_stats`` for two ResNet-20s.

  Each row holds ``devices``, ``images_per_s`` (best of ``repeats`` timed passes after one
  that compiles), ``ratio`` (to the first count) and ``max_rel_diff`` (of the covariances,
  to the first count).
  """
  devices = jax.local_devices()
  if max(device_counts) > len(devices):
    raise ValueError(f"{max(device_counts)} devices asked for, {len(devices)} present; run "
                     "with --simulate N on the CPU.")
  model, spec = models.resnet20(width=width, num_outputs=10)
  key = jax.random.key(seed)
  x = np.asarray(jax.random.normal(key, (batch_size * num_batches, image_size, image_size, 3)))
  init = jax.jit(model.init)
  variables = [init(jax.random.fold_in(key, m + 1), x[:2]) for m in range(2)]
  data = np.split(x, num_batches)
  rows, ref = [], None
  for count in device_counts:
    mesh = Mesh(np.asarray(devices[:count]), ("data",))
    stats = zipjax.compute_stats(variables, spec, data, mesh=mesh)  # compiles
    jax.block_until_ready(stats)
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(zipjax.compute_stats(variables, spec, data, mesh=mesh))
      best = min(best, time.perf_counter() - start)
    ref = ref or stats
    diff = max(float(np.max(np.abs(np.asarray(stats[n].m2) - np.asarray(ref[n].m2)))
                     / np.max(np.abs(np.asarray(ref[n].m2)))) for n in stats)
    rows.append({"devices": count, "images_per_s": len(x) / best, "max_rel_diff": diff})
  for row in rows:
    row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--simulate", type=int, default=8,
                      help="simulate this many CPU devices (0: the machine's own devices)")
  parser.add_argument("--devices", default="1,2,4,8", help="device counts to measure")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet-20 width multiplier")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if args.simulate:
    # Only takes effect before the backend starts, which nothing above has done.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.simulate)
  counts = [int(c) for c in args.devices.split(",")]
  rows = measure(counts, width=args.width, batch_size=args.batch_size,
                 num_batches=args.batches, repeats=args.repeats)
  print(f"feature statistics, 2 x ResNet-20 x{args.width:g}, "
        f"{args.batch_size * args.batches} images of 32x32 in batches of {args.batch_size}, "
        f"{jax.local_devices()[0].platform}")
  print("| devices | images/s | vs 1 device | max rel. diff |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['devices']} | {r['images_per_s']:.0f} | {r['ratio']:.2f}x | "
          f"{r['max_rel_diff']:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
