"""What pairing attention heads on their attention maps costs: a ViT's whole zip, each pairing
in a fresh process (compiling included), then repeated.

``zipjax.zip(..., pair_heads="attention")`` (the default) computes every head's attention
maps in the statistics pass; ``pair_heads="features"`` (the baseline) pairs heads on the
statistics every zip computes anyway. Two ViTs with random weights (the experiments' ViT: 4
heads, MLP 2x, patches of 4 pixels), the same calibration images for both pairings.

Rows: the first zip and the repeat with maps, each against the same call with features.
Targets: at most 1.25x on both: what the maps buy (2.6 points of joint accuracy on three ViT
pairs, experiments/results/cifar10_vit_clip) is worth at most a quarter more time.
"""

from __future__ import annotations

import dataclasses
import sys

import zipjax
from zipjax import models
from . import common

NAME = "head_pairing"
TITLE = "Heads paired on attention maps"
BASELINE = 'pair_heads="features", the same call'


@dataclasses.dataclass(frozen=True)
class Settings:
  width: int
  depth: int
  num_images: int
  batch_size: int
  timeout_s: float


SETTINGS = {
    "smoke": (Settings(16, 1, 16, 8, timeout_s=300),),
    "quick": (Settings(64, 4, 256, 128, timeout_s=300),),
    "full": (Settings(128, 4, 2000, 500, timeout_s=900),),  # the experiments' ViT and data
}


def measure(payload: dict) -> dict:
  """Times the first zip and its repeat with one pairing (in the worker process)."""
  s = Settings(**payload["settings"])
  call = common.compile_counter()
  model, spec = models.vit(s.width, s.depth, 4, 2 * s.width, patch=4, num_outputs=10)
  a, b = common.init_models(model, 2, 32)
  num_batches = -(-s.num_images // s.batch_size)
  images = common.random_images(1, s.num_images, 32)[0]
  data = [images[i * s.batch_size:(i + 1) * s.batch_size] for i in range(num_batches)]
  calls = {}
  for name in ("first", "repeat"):
    _, calls[name] = call(lambda: zipjax.zip(a, b, spec, data=data,
                                             pair_heads=payload["pair_heads"]))
  return {"calls": calls,
          "label": (f"{_label(s)}, {s.num_images} images 32x32 in batches of "
                    f"{s.batch_size}")}


def _label(s: Settings) -> str:
  return f"ViT-{s.width}x{s.depth}"


def run(scale: str, *, progress: bool = False) -> common.Result:
  rows = []
  for s in SETTINGS[scale]:
    results = {}
    for pair_heads in ("features", "attention"):
      if progress:
        print(f"head_pairing: {_label(s)}, pair_heads={pair_heads!r} in a fresh process",
              file=sys.stderr)
      results[pair_heads] = common.run_worker(
          __spec__.name, {"settings": dataclasses.asdict(s), "pair_heads": pair_heads},
          timeout_s=s.timeout_s)
    for name in ("first", "repeat"):
      maps, feats = (results[p]["calls"][name] for p in ("attention", "features"))
      rows.append(common.Row(
          NAME, f"{results['attention']['label']}: {name} zip", maps["seconds"], BASELINE,
          feats["seconds"], target=common.Target("<=", 1.25),
          notes=(f"{maps['compiles']} programs compiled against {feats['compiles']}"),
          data=results))
  return common.Result(rows)


if __name__ == "__main__":
  sys.exit(common.worker_main(measure))
