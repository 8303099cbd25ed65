"""experiments.reference_mode: the variants between zipjax's default and the reference mode."""

import pytest

from experiments import evaluate
from experiments import reference_mode


def test_each_variant_at_each_stop_between_sources_and_ensemble():
  methods = reference_mode.variant_methods(2, (None, "stage1"))
  assert [m.name for m in methods[:2]] == ["Model A", "Model B"]
  assert methods[-1].kind == "ensemble"
  merges = methods[2:-1]
  assert len(merges) == 2 * len(reference_mode.VARIANTS)
  by_name = {m.name: m for m in merges}
  ref = by_name["reference mode (stage1)"]
  assert (ref.mode, ref.capture, ref.stop_at) == ("official", "last", "stage1")
  assert ref.matcher.__name__ == "official(alpha=0.3, beta=0.125)"
  default = by_name["default (full)"]
  assert (default.mode, default.capture, default.stop_at) == ("zipjax", "every", None)
  assert by_name["default, last captures (full)"].capture == "last"


def test_average_table_has_a_row_per_variant_and_a_column_per_stop():
  rows = []
  for pair in range(2):
    for k, variant in enumerate(reference_mode.VARIANTS):
      for stop in ("full", "stage1"):
        acc = 0.5 + 0.01 * k + 0.1 * pair
        rows.append(evaluate.Row(f"{variant} ({stop})", pair, acc, (acc, acc), 1.0, 1.0))
  table = reference_mode.average_table(rows, (None, "stage1")).splitlines()
  assert table[0] == "| variant | full | stage1 |"
  assert len(table) == 2 + len(reference_mode.VARIANTS)
  assert table[2] == "| default | 55.0 ± 7.1 | 55.0 ± 7.1 |"


def test_checkpoints_and_out_are_required():
  with pytest.raises(SystemExit):
    reference_mode.main(["--checkpoints", "x"])  # --out is required


def test_alpha_beta_adds_the_default_at_those_values():
  chosen = reference_mode.variants((0.3, 0.25))
  assert list(chosen)[:-1] == list(reference_mode.VARIANTS)
  methods = reference_mode.variant_methods(2, (None,), chosen)
  tuned = {m.name: m for m in methods}["default, alpha/beta 0.3/0.25 (full)"]
  assert tuned.matcher.__name__ == "greedy(alpha=0.3, beta=0.25)"
  assert (tuned.mode, tuned.capture) == ("zipjax", "every")
  assert reference_mode.variants() == reference_mode.VARIANTS


def test_pair_table_has_a_column_per_pair_and_the_best_of_each_in_bold():
  chosen = {"default": None, "reference mode": None}
  rows = [evaluate.Row("default (full)", 0, 0.52, (0.6, 0.7), 1.0, 1.0),
          evaluate.Row("reference mode (full)", 0, 0.43, (0.6, 0.6), 1.0, 1.0),
          evaluate.Row("default (full)", 1, 0.40, (0.5, 0.5), 1.0, 1.0),
          evaluate.Row("reference mode (full)", 1, 0.44, (0.5, 0.6), 1.0, 1.0)]
  joint = reference_mode.pair_table(rows, chosen).splitlines()
  assert joint[0] == "| joint, full | pair 0 | pair 1 |"
  assert joint[2:] == ["| default | **52.0** | 40.0 |", "| reference mode | 43.0 | **44.0** |"]
  avg = reference_mode.pair_table(rows, chosen, metric="avg").splitlines()
  assert avg[2:] == ["| default | **65.0** | 50.0 |", "| reference mode | 60.0 | **55.0** |"]


def test_alpha_beta_takes_one_pair():
  with pytest.raises(SystemExit):
    reference_mode.main(["--checkpoints", "x", "--out", "y", "--alpha-beta", "0.7/1,0.5/0.5"])
