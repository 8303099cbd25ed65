"""The analysis sweeps end to end on tiny data (the digits config of tests/test_run.py): each
sweep writes its outputs, holds the swept values, and agrees with the Table 1 runner where
both build the same model."""

import csv
import os

import pytest

from experiments import configs
from experiments import run as run_lib
from experiments import sweeps
from experiments import evaluate as eval_lib

# The end-to-end sweeps train models (slow); the runner tests cover a real merge.
slow = pytest.mark.slow


def _tiny_config():
  config = configs.load("digits_default")
  return configs.override(config, "train.epochs=1", "train.batch_size=32", "num_runs=1",
                          "model.width=0.25", "model.num_outputs=16",
                          "calibration.num_images=64", "calibration.batch_size=32",
                          "eval_batch_size=512",
                          "merge.methods=('weight_avg', 'permute', 'zipit')",
                          "merge.stop_points=(None, 'stage2')")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The runner's Table 1 rows on the tiny config, and its checkpoints for the sweeps."""
  out = tmp_path_factory.mktemp("table1")
  config = _tiny_config()
  rows, _ = run_lib.run(config, out_dir=str(out), progress=False)
  return config, {r.method: r for r in rows}, str(out / "checkpoints")


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _check_outputs(out, sweep, label, values):
  for suffix in (".md", ".csv", "_rows.csv", ".png"):
    assert os.path.getsize(out / f"{sweep}{suffix}") > 0
  assert os.path.getsize(out / "config.json") > 0
  rows = _read(out / f"{sweep}_rows.csv")
  assert {r[label] for r in rows} == set(values)
  for r in rows:
    for key in ("joint", "task0", "task1", "avg"):
      assert 0.0 <= float(r[key]) <= 1.0
  for r in _read(out / f"{sweep}.csv"):
    assert 0.0 <= float(r["joint"].split(" ± ")[0]) <= 100.0
  return rows


def _same(record_row, ref_row):
  assert (record_row.joint, record_row.per_task) == (ref_row.joint, ref_row.per_task)


@slow
def test_beta_sweep_matches_the_runner_at_its_beta(reference, tmp_path):
  config, ref, ckpt = reference
  records, md = sweeps.run_sweep(config, "beta", values=(0.0, 0.5),
                                 stop_points=(None, "stage2"), out_dir=str(tmp_path),
                                 checkpoints=ckpt, progress=False)
  _check_outputs(tmp_path, "beta", "beta", {"0", "0.5"})
  assert len(records) == 2 * 2
  assert "| beta | Method |" in md and "| 0.5 | ZipIt! (partial, stage2) |" in md
  by = {(r.value, r.row.method): r.row for r in records}
  # The config's beta (0.5) builds the runner's ZipIt! models: the same accuracies exactly.
  _same(by[(0.5, "ZipIt! (full)")], ref["ZipIt! (full)"])
  _same(by[(0.5, "ZipIt! (partial, stage2)")], ref["ZipIt! (partial, stage2)"])
  assert not os.path.exists(tmp_path / "checkpoints")  # trained nothing


@slow
def test_matchers_sweep_identity_is_weight_averaging(reference, tmp_path):
  config, ref, ckpt = reference
  names = ("identity", "permute", "kmeans", "optimal", "greedy")
  records, md = sweeps.run_sweep(config, "matchers", values=names, out_dir=str(tmp_path),
                                 checkpoints=ckpt, progress=False)
  labels = [sweeps.matcher_by_name(n)[0] for n in names]
  _check_outputs(tmp_path, "matchers", "matcher", set(labels))
  assert [r.row.method for r in records] == labels
  assert all(r.row.seconds > 0 for r in records)
  by = {r.row.method: r.row for r in records}
  _same(by["Identity (W.Avg)"], ref["W.Avg"])
  _same(by["Permute"], ref["Permute"])
  _same(by["Greedy (zip, alpha=0.5, beta=0.5)"], ref["ZipIt! (full)"])
  assert "| Match s |" in md.splitlines()[0] + " |"


@slow
def test_calibration_sweep_matches_the_runner_at_its_size(reference, tmp_path):
  config, ref, ckpt = reference
  records, _ = sweeps.run_sweep(config, "calibration", values=(32, 64), out_dir=str(tmp_path),
                                checkpoints=ckpt, progress=False)
  _check_outputs(tmp_path, "calibration", "images", {"32", "64"})
  methods = {r.row.method for r in records}
  assert methods == {"ZipIt! (full)", "Permute", "ZipIt! (full), augmented",
                     "Permute, augmented"}
  by = {(r.value, r.row.method): r.row for r in records}
  # 64 images without augmentation is the config's calibration set.
  _same(by[(64, "ZipIt! (full)")], ref["ZipIt! (full)"])
  _same(by[(64, "Permute")], ref["Permute"])


@slow
def test_width_sweep_trains_per_width_and_matches_the_runner(reference, tmp_path, capsys):
  config, ref, ckpt = reference
  # Width 0.25 is the reference's width: the sweep restores the runner's models from there.
  os.makedirs(tmp_path / "ckpt")
  os.symlink(ckpt, tmp_path / "ckpt" / "width0.25")
  args = ["--config", "digits_default", "--sweep", "width", "--values", "0.25,0.5",
          "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "ckpt"), "--quiet"]
  for s in ("train.epochs=1", "train.batch_size=32", "num_runs=1", "model.num_outputs=16",
            "calibration.num_images=64", "calibration.batch_size=32", "eval_batch_size=512"):
    args += ["--set", s]
  assert sweeps.main(args) == 0
  out = capsys.readouterr().out
  assert "| width | Method |" in out and "| 0.5 | Ensemble |" in out
  rows = _check_outputs(tmp_path / "out", "width", "width", {"0.25", "0.5"})
  assert {r["method"] for r in rows} == {"Model A", "Model B", "W.Avg", "Permute",
                                         "ZipIt! (full)", "Ensemble"}
  assert os.path.isdir(tmp_path / "ckpt" / "width0.5" / "run0_task1")  # trained at width 0.5
  narrow = {r["method"]: r for r in rows if r["width"] == "0.25"}
  for method in ("W.Avg", "Permute", "ZipIt! (full)"):
    assert narrow[method]["joint"] == f"{ref[method].joint:.5f}"


@slow
def test_alpha_beta_sweep_matches_the_runner_at_its_alpha_and_beta(reference, tmp_path, capsys):
  config, ref, ckpt = reference
  args = ["--config", "digits_default", "--sweep", "alpha_beta", "--values", "0.5/0.5,0.1/0",
          "--stop-points", "None,stage2", "--out", str(tmp_path), "--checkpoints", ckpt,
          "--quiet"]
  for s in ("train.epochs=1", "train.batch_size=32", "num_runs=1", "model.width=0.25",
            "model.num_outputs=16", "calibration.num_images=64", "calibration.batch_size=32",
            "eval_batch_size=512"):
    args += ["--set", s]
  assert sweeps.main(args) == 0
  out = capsys.readouterr().out
  rows = _check_outputs(tmp_path, "alpha_beta", "alpha/beta", {"0.5/0.5", "0.1/0"})
  assert len(rows) == 2 * 2
  assert "| alpha/beta | Method |" in out and "| 0.1/0 | ZipIt! (partial, stage2) |" in out
  # The config's alpha and beta (0.5, 0.5) build the runner's ZipIt! models exactly.
  by = {(r["alpha/beta"], r["method"]): r for r in rows}
  for method in ("ZipIt! (full)", "ZipIt! (partial, stage2)"):
    assert float(by[("0.5/0.5", method)]["joint"]) == pytest.approx(ref[method].joint, abs=1e-5)
  best = max(("0.5/0.5", "0.1/0"), key=lambda v: float(by[(v, "ZipIt! (full)")]["joint"]))
  assert f"best alpha/beta by ZipIt! (full) joint accuracy: {best} " in out


def _record(value, method, joint, avg, pair=0):
  row = eval_lib.Row(method, pair, joint, (avg, avg), 1.0, 0.0)
  return sweeps.Record("alpha_beta", value, row)


def test_best_value_takes_the_highest_mean_of_the_method():
  records = [_record((0.1, 0.5), "ZipIt! (full)", 0.40, 0.70),
             _record((0.1, 0.5), "ZipIt! (full)", 0.50, 0.70, pair=1),
             _record((0.3, 0.5), "ZipIt! (full)", 0.46, 0.80),
             _record((0.3, 0.5), "ZipIt! (full)", 0.46, 0.80, pair=1),
             _record((0.5, 0.5), "ZipIt! (partial, stage2)", 0.90, 0.90)]
  value, (mean, std) = sweeps.best_value(records)
  assert value == (0.3, 0.5) and mean == pytest.approx(46.0) and std == pytest.approx(0.0)
  assert sweeps.best_value(records, metric="avg")[0] == (0.3, 0.5)
  assert sweeps.best_value(records, method="ZipIt! (partial, stage2)")[0] == (0.5, 0.5)
  with pytest.raises(ValueError, match="No record of 'Permute'"):
    sweeps.best_value(records, method="Permute")


def test_alpha_beta_values_parse_as_pairs():
  assert sweeps.parse_values("alpha_beta", "0.3/0.125, 1/0") == ((0.3, 0.125), (1.0, 0.0))
  assert len(sweeps.parse_values("alpha_beta", None)) == 25
  with pytest.raises(ValueError, match="ALPHA/BETA pairs"):
    sweeps.parse_values("alpha_beta", "0.3")
