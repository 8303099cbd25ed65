"""The Colab notebooks run top to bottom in their small setting, on the CPU, without network.

Each notebook reads ``ZIPJAX_NOTEBOOK_SMALL=1`` (tiny models, epochs and data; tfds's mock
data or scikit-learn's bundled digits instead of downloads) and runs in a fresh kernel of this
interpreter, in a temporary folder. A cell that raises fails the test.
"""

from __future__ import annotations

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> str:
  """A Jupyter data folder whose "python3" kernel is this interpreter (found before any
  other "python3" kernel on the machine)."""
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("jupyter")
  kernelspec.write_kernel_spec(root / "kernels" / "python3")
  return str(root)


def test_there_are_notebooks():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "cifar10_reproduction.ipynb",
                                         "bring_your_own_model.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  first, second = nb.cells[0], nb.cells[1]
  assert first.cell_type == "markdown" and BADGE in first.source
  assert f"/blob/main/colab/{path.name})" in first.source
  assert second.cell_type == "code" and "pip" in second.source and "find_spec" in second.source
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"
  assert "ZIPJAX_NOTEBOOK_SMALL" in "".join(c.source for c in nb.cells)


@pytest.mark.slow  # 25-65 s each; the runner's own tests cover what quickstart runs
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_small(path, tmp_path, monkeypatch, kernel_dir):
  monkeypatch.setenv("ZIPJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JUPYTER_PATH", kernel_dir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # this checkout's zipjax and experiments
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  # No network: anything that tries to download goes to a closed local port and fails.
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")
  monkeypatch.setenv("NO_PROXY", "")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback
