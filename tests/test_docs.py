"""The documentation site builds from a clean state with every Sphinx warning an error."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")],
      capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-5000:]
  html = tmp_path / "html"
  assert "Merges two models" in (html / "api" / "zipjax.html").read_text()  # autodoc ran
  for page in ("guides/specs", "guides/transformers", "design", "notebooks/quickstart"):
    assert (html / f"{page}.html").exists(), page
