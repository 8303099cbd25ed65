"""The official_zip benchmark says in words what it misses (torch, the official code's imports,
a checkout) instead of timing nothing in silence, and runs no worker then. Needs no torch."""

import math

import numpy as np
import pytest

from experiments import benchmarks
from experiments.benchmarks import common
from experiments.benchmarks import official_zip


@pytest.fixture
def no_workers(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError(f"a worker ran: {args} {kwargs}")
  monkeypatch.setattr(common, "run_worker", fail)


@pytest.fixture
def checkout(tmp_path):
  """A folder with the files of a checkout that the benchmark imports (empty)."""
  for name in official_zip.CHECKOUT_FILES:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("")
  return tmp_path


def _only_row(scale="smoke"):
  result = official_zip.run(scale)
  assert len(result.rows) == len(official_zip.SETTINGS[scale])
  row = result.rows[0].to_json()
  assert row["seconds"] is None and row["baseline_seconds"] is None and row["ratio"] is None
  assert row["case"].endswith("not run") and row["met"] is None
  assert result.remarks == [f"official_zip: {row['notes']}"]
  return row["notes"]


def test_registered_after_first_zip():
  names = list(benchmarks.BENCHMARKS)
  assert names.index("official_zip") == names.index("first_zip") + 1
  assert "official_zip" in benchmarks.__doc__


def test_missing_torch_says_what_to_install(monkeypatch, checkout, no_workers):
  monkeypatch.setattr(official_zip, "_installed", lambda module: module not in ("torch",
                                                                                "fvcore"))
  monkeypatch.setenv("ZIPIT_OFFICIAL", str(checkout))
  notes = _only_row()
  assert notes.startswith("NOT RUN")
  assert "pip install torch fvcore" in notes
  assert "ZIPIT_OFFICIAL" not in notes  # the checkout is there


def test_missing_checkout_says_how_to_point_at_one(monkeypatch, no_workers):
  monkeypatch.setattr(official_zip, "_installed", lambda module: True)
  monkeypatch.delenv("ZIPIT_OFFICIAL", raising=False)
  notes = _only_row("full")
  assert "set ZIPIT_OFFICIAL=/path/to/ZipIt" in notes and "gstoica27/ZipIt" in notes
  assert "pip install" not in notes


def test_a_folder_that_is_no_checkout_is_named(monkeypatch, tmp_path, no_workers):
  monkeypatch.setattr(official_zip, "_installed", lambda module: False)
  monkeypatch.setenv("ZIPIT_OFFICIAL", str(tmp_path))
  notes = _only_row()
  assert f"ZIPIT_OFFICIAL={tmp_path} is not a checkout" in notes
  assert "model_merger.py" in notes and "pip install torch" in notes


def test_nothing_missing_means_available(monkeypatch, checkout):
  monkeypatch.setattr(official_zip, "_installed", lambda module: True)
  assert official_zip.unavailable(str(checkout)) is None


def test_agreement_of_logits():
  ref = np.array([[1.0, -2.0], [0.5, 0.0]])
  same = official_zip.agreement(ref, ref)
  assert same == {"max_rel_diff": 0.0, "argmax_agree": 1.0}
  off = official_zip.agreement(ref + [[0.0, 0.0], [0.0, 1.0]], ref)
  assert math.isclose(off["max_rel_diff"], 0.5) and off["argmax_agree"] == 0.5
