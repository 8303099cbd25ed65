"""The experiment runner end to end on tiny data: train, checkpoint, merge, evaluate, write."""

import dataclasses
import json
import os

import numpy as np
import pytest

import zipjax
from experiments import configs
from experiments import evaluate as eval_lib
from experiments import run as run_lib


def _tiny_config():
  config = configs.load("digits_default")
  return configs.override(config, "train.epochs=1", "train.batch_size=32", "num_runs=1",
                          "model.width=0.25", "model.num_outputs=16",
                          "calibration.num_images=64", "calibration.batch_size=32",
                          "eval_batch_size=128")


@pytest.mark.slow  # ~130 s; the runner end to end also runs in test_main_prints_the_table
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
  assert "digits_default: 1 pair of source models merged" in out
  # Source models are not built: no build time; FLOPs carry a unit.
  model_a = next(line for line in out.splitlines() if line.startswith("| Model A |"))
  assert model_a.endswith("| — |") and (" M |" in model_a or " k |" in model_a), model_a


def _fake_cifar(directory, seed, per_class=12):
  """A CIFAR-10-shaped dataset of random images whose mean colour depends on the class."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", per_class), ("test", per_class // 2)):
    y = np.repeat(np.arange(10), n).astype(np.int64)
    x = rng.integers(0, 128, size=(len(y), 32, 32, 3)) + (y * 12)[:, None, None, None]
    np.savez(os.path.join(directory, f"{split}.npz"), x=x.astype(np.uint8), y=y)
  return str(directory)


def _multidataset_config(tmp_path):
  base = configs.load("multidataset_resnet50_pairs:local")
  data = tuple(configs.DataConfig(source="cifar10_npz", path=_fake_cifar(tmp_path / f"d{i}", i))
               for i in range(2))
  config = configs.override(
      dataclasses.replace(base, datasets=data, groups=((0, 1),)),
      "model.factory=resnet20", "model.width=0.25", "model.num_outputs=16",
      "train.epochs=1", "train.batch_size=40", "calibration.num_images=40",
      "calibration.batch_size=20", "calibration.augmentation=False", "eval_batch_size=64",
      "merge.methods=('ensemble', 'permute', 'zipit')", "merge.stop_points=(None,)")
  return config


def test_tasks_that_are_datasets_number_their_labels_one_after_the_other(tmp_path):
  """Each model trains on its own dataset with the first outputs of a shared head; each task
  is evaluated on its own test set, labels numbered one after the other."""
  config = _multidataset_config(tmp_path)
  exp = run_lib.prepare(config)
  tasks, columns = run_lib.group_tasks(config, exp, 0, (0, 1))
  np.testing.assert_array_equal(tasks[1], np.arange(10, 20))
  np.testing.assert_array_equal(columns[1], np.arange(10))
  _, test = run_lib.group_data(config, exp, 0, (0, 1))
  labels = np.concatenate([y for _, y in test])
  assert sorted(set(labels.tolist())) == list(range(20)) and len(labels) == 2 * 60


@pytest.mark.slow  # ~40 s; the runner end to end also runs in test_main_prints_the_table
def test_runner_merges_models_trained_on_different_datasets(tmp_path):
  config = _multidataset_config(tmp_path)
  rows, md = run_lib.run(config, out_dir=str(tmp_path / "out"), progress=False)
  by = {r.method: r for r in rows}
  assert list(by) == ["Model A", "Model B", "Permute", "ZipIt! (full)", "Ensemble"]
  for r in rows:
    assert 0.0 <= r.joint <= 1.0 and len(r.per_task) == 2
  # The ensemble's heads are the sources: each task's accuracy is its own model's.
  assert by["Ensemble"].per_task == (by["Model A"].per_task[0], by["Model B"].per_task[1])
  assert "| ZipIt! (full) |" in md


def test_train_only_then_evaluate_runs_restores_the_models(tmp_path, capsys, monkeypatch):
  args = ["--set", "train.epochs=1", "--set", "num_runs=1", "--set", "model.width=0.25",
          "--set", "model.num_outputs=16", "--set", "calibration.num_images=64",
          "--out", str(tmp_path), "--quiet"]
  assert run_lib.main(args + ["--train-only"]) == 0
  assert "the source models of 1 run(s) are trained" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["run0_task0", "run0_task1"]
  assert not os.path.exists(tmp_path / "results.md")  # nothing merged
  config = configs.override(configs.load("digits_default"), "train.epochs=1", "num_runs=1",
                            "model.width=0.25", "model.num_outputs=16",
                            "calibration.num_images=64")
  exp = run_lib.prepare(config)
  methods = [eval_lib.Method("Model A", "source"),
             eval_lib.Method("ZipIt!", "merge", zipjax.match.greedy())]
  # With ``done``, an evaluated run is kept and not evaluated again, unless its methods or
  # its config differ: then only what differs is evaluated.
  done = str(tmp_path / "done")
  checkpoints = str(tmp_path / "checkpoints")
  first = run_lib.evaluate_runs(config, exp, [0], methods, checkpoints=checkpoints,
                                progress=False, done=done)
  assert [(r.method, r.pair) for r in first] == [("Model A", 0), ("ZipIt!", 0)]
  assert all(0.0 <= r.joint <= 1.0 for r in first)
  (kept,) = [f for f in os.listdir(done) if f.endswith(".csv")]
  assert kept.startswith("run0_group0_") and kept.endswith(".csv")
  real_evaluate = eval_lib.evaluate_methods
  monkeypatch.setattr(eval_lib, "evaluate_methods", _must_not_run)
  again = run_lib.evaluate_runs(config, exp, [0], methods, checkpoints="/nonexistent",
                                progress=False, done=done)
  assert [(r.method, r.pair) for r in again] == [(r.method, r.pair) for r in first]
  for a, b in zip(again, first):
    np.testing.assert_allclose([a.joint, *a.per_task], [b.joint, *b.per_task], atol=1e-5)
  # A method's line deleted (its merge changed in the library): that method alone is
  # evaluated again, to the same figures, and the file is whole again.
  path = os.path.join(done, kept)
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(line for line in lines if not line.startswith("ZipIt!,"))
  evaluated = []
  monkeypatch.setattr(eval_lib, "evaluate_methods", lambda *a, methods, **k: (
      evaluated.append([m.name for m in methods]), real_evaluate(*a, methods=methods, **k))[1])
  redone = run_lib.evaluate_runs(config, exp, [0], methods, checkpoints=checkpoints,
                                 progress=False, done=done)
  assert evaluated == [["ZipIt!"]]
  assert [r.method for r in redone] == [r.method for r in eval_lib.read_rows(path)] == [
      "Model A", "ZipIt!"]
  np.testing.assert_allclose(redone[1].joint, first[1].joint, atol=1e-5)
  # Fewer methods: taken from the kept rows, which keep the others.
  monkeypatch.setattr(eval_lib, "evaluate_methods", _must_not_run)
  fewer = run_lib.evaluate_runs(config, exp, [0], methods[:1], checkpoints=checkpoints,
                                progress=False, done=done)
  assert [r.method for r in fewer] == ["Model A"]
  # A method added, and one of the same name with other options: those two alone are
  # evaluated; every row is kept, the others as they were.
  evaluated.clear()
  monkeypatch.setattr(eval_lib, "evaluate_methods", lambda *a, methods, **k: (
      evaluated.append([m.name for m in methods]), real_evaluate(*a, methods=methods, **k))[1])
  changed = [methods[0], eval_lib.Method("ZipIt!", "merge", zipjax.match.greedy(alpha=0.3)),
             eval_lib.Method("Permute", "merge", zipjax.match.permute())]
  rows = run_lib.evaluate_runs(config, exp, [0], changed, checkpoints=checkpoints,
                               progress=False, done=done)
  assert evaluated == [["ZipIt!", "Permute"]]
  assert [r.method for r in rows] == ["Model A", "ZipIt!", "Permute"]
  np.testing.assert_allclose(rows[0].per_task, first[0].per_task, atol=1e-5)
  assert sorted(os.listdir(done)) == sorted([kept, kept.replace(".csv", ".methods.json")])
  monkeypatch.setattr(eval_lib, "evaluate_methods", _must_not_run)
  other = configs.override(config, "calibration.num_images=32")
  with pytest.raises(AssertionError, match="evaluated again"):  # another config
    run_lib.evaluate_runs(other, run_lib.prepare(other), [0], methods, checkpoints=checkpoints,
                          progress=False, done=done)


def _must_not_run(*args, **kwargs):
  raise AssertionError("evaluated again")


def test_method_digest_tells_head_pairings_apart_and_keeps_older_digests():
  """pair_heads="features" is another method; at its default the digest is the one rows
  kept before the field existed were stored with."""
  greedy = eval_lib.Method("ZipIt!", "merge", zipjax.match.greedy())
  features = dataclasses.replace(greedy, pair_heads="features")
  assert run_lib._method_digest(greedy) != run_lib._method_digest(features)
  older = {f.name: run_lib._name_of(getattr(greedy, f.name))
           for f in dataclasses.fields(greedy) if f.name != "pair_heads"}
  assert run_lib._method_digest(greedy) == run_lib._digest(older)


def test_kept_rows_without_a_digest_are_evaluated_again_and_dropped(tmp_path):
  """A kept row whose method digest is lost is never taken: it is evaluated again if asked
  for, and dropped from the file otherwise."""
  config = configs.load("digits_default")
  methods = [eval_lib.Method(n, "merge", zipjax.match.greedy()) for n in ("a", "b", "c")]
  calls = []

  def evaluate(ms):
    calls.append([m.name for m in ms])
    return [eval_lib.Row(m.name, 0, 0.5, (0.5, 0.5), 1.0, 1.0) for m in ms]

  done = str(tmp_path)
  run_lib._rows_of(done, config, 0, 0, methods, 0, evaluate)
  (digests,) = [os.path.join(done, f) for f in os.listdir(done) if f.endswith(".json")]
  with open(digests) as f:
    kept = json.load(f)
  del kept["b"], kept["c"]
  with open(digests, "w") as f:
    json.dump(kept, f)
  rows = run_lib._rows_of(done, config, 0, 0, methods[:2], 0, evaluate)
  assert calls == [["a", "b", "c"], ["b"]]
  assert [r.method for r in rows] == ["a", "b"]
  with open(digests) as f:
    assert sorted(json.load(f)) == ["a", "b"]  # "c" dropped


def test_pairs_table_bolds_the_best_merge_of_each_pair(tmp_path):
  row = lambda m, p, j: eval_lib.Row(m, p, j, (j, j), 1.0, 1.0)  # noqa: E731
  rows = [row("Model A", 0, 0.9), row("x", 0, 0.2), row("y", 0, 0.3), row("Ensemble", 0, 0.95),
          row("Model A", 1, 0.8), row("x", 1, 0.5), row("y", 1, 0.1), row("Ensemble", 1, 0.9)]
  md = eval_lib.pairs_table(rows).splitlines()
  assert md[0] == "| joint | pair 0 | pair 1 | mean |"
  assert md[2:] == ["| Model A | 90.0 | 80.0 | 85.0 |", "| x | 20.0 | **50.0** | 35.0 |",
                    "| y | **30.0** | 10.0 | 20.0 |", "| Ensemble | 95.0 | 90.0 | 92.5 |"]
  eval_lib.write_table(rows, str(tmp_path), name="t")
  assert (tmp_path / "t_pairs.md").read_text() == "\n".join(md) + "\n"
  eval_lib.write_table(rows[:4], str(tmp_path), name="one")  # one pair: no per-pair table
  assert not (tmp_path / "one_pairs.md").exists()


@pytest.mark.slow
def test_vit_config_runs_every_method(tmp_path):
  """cifar10_vit_clip:local's methods (heads merged, the stream by permute, heads in place,
  attention unmerged, the baselines) on a tiny fake CIFAR-10: every row is made."""
  base = configs.load("cifar10_vit_clip:local")
  data = dataclasses.replace(base.data, path=_fake_cifar(tmp_path / "cifar", 0),
                             class_embeddings=None, max_per_class=None,
                             max_test_per_class=None)
  config = configs.override(dataclasses.replace(base, datasets=(data,)), "model.width=16",
                            "train.batch_size=40", "calibration.num_images=40",
                            "calibration.batch_size=20", "eval_batch_size=64")
  exp = run_lib.prepare(config)
  methods = run_lib.methods_for(config, 2)
  with pytest.warns(zipjax.UnmergedWarning, match="attention left unmerged"):
    rows = run_lib.evaluate_runs(config, exp, [0], methods, checkpoints=str(tmp_path / "ckpt"),
                                 progress=False)
  assert [r.method for r in rows] == [m.name for m in methods]
  assert "ZipIt! stream by permute (full)" in [r.method for r in rows]
  assert all(0.0 <= r.joint <= 1.0 for r in rows)
