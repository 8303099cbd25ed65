"""The experiment runner end to end on tiny data: train, checkpoint, merge, evaluate, write."""

import os

import numpy as np

from experiments import configs
from experiments import run as run_lib


def _tiny_config():
  config = configs.load("digits_default")
  return configs.override(config, "train.epochs=1", "train.batch_size=32", "num_runs=1",
                          "model.width=0.25", "model.num_outputs=16",
                          "calibration.num_images=64", "calibration.batch_size=32",
                          "eval_batch_size=128")


def test_runner_end_to_end_and_resumes_from_checkpoints(tmp_path):
  config = _tiny_config()
  rows, md = run_lib.run(config, out_dir=str(tmp_path), progress=False)
  names = [r.method for r in rows]
  assert names == ["Model A", "Model B", "W.Avg", "Git Re-Basin", "Permute", "ZipIt! (full)",
                   "ZipIt! (partial, stage2)", "ZipIt! (partial, stage1)", "Ensemble"]
  for r in rows:
    assert 0.0 <= r.joint <= 1.0 and len(r.per_task) == 2
    assert all(0.0 <= a <= 1.0 for a in r.per_task)
  by = {r.method: r for r in rows}
  # One model's FLOPs for merged models, twice that for the ensemble, in between for heads.
  assert by["ZipIt! (full)"].gflops == by["Model A"].gflops
  assert by["Model A"].gflops < by["ZipIt! (partial, stage1)"].gflops < by["Ensemble"].gflops
  np.testing.assert_allclose(by["Ensemble"].gflops, 2 * by["Model A"].gflops, rtol=0.02)
  for f in ("results.md", "results.csv", "results_rows.csv", "partial_zip.png", "config.json"):
    assert os.path.getsize(tmp_path / f) > 0
  assert "| ZipIt! (full) |" in md
  # A second run restores the trained models from their checkpoints: same numbers.
  again = configs.override(config, "merge.methods=('zipit',)", "merge.stop_points=(None,)")
  rows2, _ = run_lib.run(again, out_dir=str(tmp_path), progress=False)
  assert [r.method for r in rows2] == ["Model A", "Model B", "ZipIt! (full)"]
  for r in rows2:
    assert (r.joint, r.per_task) == (by[r.method].joint, by[r.method].per_task)


def test_main_prints_the_table(tmp_path, capsys):
  config_args = ["--set", "train.epochs=1", "--set", "num_runs=1", "--set", "model.width=0.25",
                 "--set", "model.num_outputs=16", "--set", "calibration.num_images=64",
                 "--set", "merge.methods=('zipit', 'ensemble')", "--set",
                 "merge.stop_points=(None,)", "--out", str(tmp_path), "--quiet"]
  assert run_lib.main(config_args) == 0
  out = capsys.readouterr().out
  assert "| Method |" in out and "| ZipIt! (full) |" in out and "| Ensemble |" in out
