"""The benchmark suite runs at its smallest scale and writes well-formed JSON and Markdown.

Nothing here looks at how fast anything is: timings are the benchmarks' business.
"""

import json
import math
import os

import pytest

from experiments import benchmarks
from experiments.benchmarks import common
from experiments.benchmarks import suite

# Slow (~60 s of smoke runs): the real-pair merge test took its place in the default run;
# run the benchmark smoke checks with -m slow.
pytestmark = pytest.mark.slow

ROW_KEYS = {"benchmark", "case", "seconds", "baseline", "baseline_seconds", "ratio", "target",
            "met", "checks_ok", "measure", "notes", "data"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  code = suite.main(["--smoke", "--no-progress", "--out", str(out)])
  with open(os.path.join(out, "results.json")) as f:
    report = json.load(f)
  with open(os.path.join(out, "results.md")) as f:
    markdown = f.read()
  return code, report, markdown


def _is_number_or_none(x):
  return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                       and math.isfinite(x))


def test_every_benchmark_runs_and_reports(smoke_run):
  code, report, _ = smoke_run
  errors = {b["name"]: b["error"] for b in report["benchmarks"] if b["error"]}
  assert not errors, errors
  assert code == 0
  assert report["scale"] == "smoke"
  assert [b["name"] for b in report["benchmarks"]] == list(benchmarks.BENCHMARKS)
  for key in ("python", "jax", "cpu_count", "backend"):
    assert key in report["environment"]
  for bench in report["benchmarks"]:
    assert bench["rows"], bench["name"]
    assert isinstance(bench["summary"], dict) and isinstance(bench["remarks"], list)
    for row in bench["rows"]:
      assert set(row) == ROW_KEYS
      assert row["benchmark"] == bench["name"]
      assert isinstance(row["case"], str) and row["case"]
      for key in ("seconds", "baseline_seconds", "ratio"):
        assert _is_number_or_none(row[key]), (row["case"], key)
      if row["measure"] == "time" and row["seconds"] and row["baseline_seconds"]:
        assert math.isclose(row["ratio"], row["seconds"] / row["baseline_seconds"])
      if row["target"] is not None:
        assert row["target"]["op"] in ("<=", ">=")
        assert row["met"] in (True, False, None)
      else:
        assert row["met"] is None


def test_benchmark_specific_fields(smoke_run):
  _, report, _ = smoke_run
  by_name = {b["name"]: b for b in report["benchmarks"]}
  greedy_rows = by_name["greedy"]["rows"]
  measured = [r for r in greedy_rows if not r["data"]["extrapolated"]]
  assert measured and all(r["data"]["identical"] is True for r in measured)
  # The smoke scale extrapolates the plain loop for its largest case.
  assert any(r["data"]["extrapolated"] for r in greedy_rows)
  growth = by_name["greedy"]["summary"]["growth_exponent"]
  assert growth and all(_is_number_or_none(g["all_widths"]) for g in growth.values())
  assert by_name["zip_stages"]["summary"]["identical_to_zip"] is True
  memory = by_name["zip_memory"]["summary"]
  assert memory["model_bytes"] > 0 and memory["stats_bytes"] > 0
  assert set(memory["calls"]) == {"first call", "second call"}
  # apply_merges times in a worker process, under the steady allocator, every merge kind
  # against one copy baseline.
  apply_rows = by_name["apply_merges"]["rows"]
  assert {r["data"]["merges"] for r in apply_rows} == {"identity", "greedy", "features"}
  assert all(r["data"]["allocator_env"] == common.STEADY_ALLOCATOR_ENV for r in apply_rows)
  timed = [r for r in apply_rows if "first call" not in r["case"]]
  assert len({r["baseline_seconds"] for r in timed}) == 1
  # First calls, compilation included, have no baseline; identity merges of another seed
  # have the same shapes and find the kernels compiled.
  first = {r["case"].split(": ")[-1]: r for r in apply_rows
           if "first call" in r["case"] and r["data"]["merges"] == "identity"}
  assert all(r["baseline_seconds"] is None and r["seconds"] > 0 for r in first.values())
  assert (first["first call on other merges of the kind"]["seconds"]
          < first["first call (compiling)"]["seconds"])


def test_markdown_table_matches_json(smoke_run):
  _, report, markdown = smoke_run
  lines = markdown.splitlines()
  header = "| " + " | ".join(suite.COLUMNS) + " |"
  start = lines.index(header)
  assert set(lines[start + 1]) <= set("|-")
  table = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    table.append(line)
  rows = [r for b in report["benchmarks"] for r in b["rows"]]
  assert len(table) == len(rows)
  for line, row in zip(table, rows):
    cells = line.replace("\\|", "").strip("|").split("|")
    assert len(cells) == len(suite.COLUMNS), line
    assert cells[0].strip() == row["benchmark"]
    assert cells[1].strip() == row["case"].replace("|", "")
  assert markdown.endswith("\n") and "nan" not in markdown.lower().split()


def test_only_and_bad_names(tmp_path, capsys):
  assert suite.main(["--smoke", "--no-progress", "--only", "greedy,batchnorm", "--out",
                     str(tmp_path)]) == 0
  with open(tmp_path / "results.json") as f:
    report = json.load(f)
  assert [b["name"] for b in report["benchmarks"]] == ["greedy", "batchnorm"]
  assert suite.main(["--only", "nope", "--out", str(tmp_path)]) == 2
  assert "nope" in capsys.readouterr().err
  with pytest.raises(ValueError, match="scale"):
    suite.run_suite(["greedy"], "huge")


def test_formatting():
  assert common.fmt_ratio(0.5) == "0.5 (2x faster)"
  assert common.fmt_ratio(0.5, "memory") == "0.5"
  assert common.fmt_ratio(None) == "-"
  assert common.fmt_seconds(0.0123) == "12.3 ms"
  assert common.Target("<=", 1.3).met(1.2) and not common.Target("<=", 1.3).met(1.4)
  row = common.Row("x", "c", 2.0, "b", 1.0, target=common.Target("<=", 3.0), checks_ok=False)
  assert row.ratio == 2.0 and row.met is False
  assert common.loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
