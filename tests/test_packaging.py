"""Packaging: the sdist and wheel build, the wheel holds the library and its experiments under
names of their own and requires only the library's dependencies, and the quickstart notebook's
install cell installs the wheel into a fresh virtual environment and runs against it.

The fresh environment installs nothing from the network: it sees this environment's
third-party packages through a ``.pth`` line (a path added that way is not a site folder, so
the editable install of this checkout stays invisible there), and pip runs with no index.
"""

from __future__ import annotations

import email.parser
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY_REQUIREMENTS = {"jax", "flax", "networkx", "numpy", "scipy", "tqdm"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
  """The sdist and the wheel, the wheel built from the sdist (as ``python -m build`` does)."""
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                  str(ROOT)], check=True, capture_output=True, text=True)
  return out


def _wheel(dist: pathlib.Path) -> pathlib.Path:
  (wheel,) = dist.glob("zipjax-*.whl")
  return wheel


def test_wheel_installs_no_generic_top_level_package(dist):
  with zipfile.ZipFile(_wheel(dist)) as whl:
    top = {name.split("/")[0] for name in whl.namelist()}
    names = whl.namelist()
  assert {t for t in top if not t.endswith(".dist-info")} == {"zipjax", "zipjax_experiments"}
  for module in ("zipjax/_src/zipping.py", "zipjax/models/resnet.py",
                 "zipjax_experiments/run.py", "zipjax_experiments/configs/digits_default.py",
                 "zipjax_experiments/benchmarks/suite.py"):
    assert module in names
  assert not any("/results/" in n for n in names), "results are not part of the package"


def test_wheel_requires_only_the_library(dist):
  with zipfile.ZipFile(_wheel(dist)) as whl:
    (meta,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(whl.read(meta).decode())
  unconditional = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
                   for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
  assert unconditional == LIBRARY_REQUIREMENTS
  assert {"experiments", "orbax", "torch", "tfds", "dev"} <= set(
      metadata.get_all("Provides-Extra"))


def _fresh_env(where: pathlib.Path) -> pathlib.Path:
  """A new virtual environment that sees this one's third-party packages; its python."""
  subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
  python = where / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                         "['purelib'])"], check=True, capture_output=True, text=True)
  # This environment's third-party packages, after the fresh environment's own.
  (pathlib.Path(site.stdout.strip()) / "dependencies.pth").write_text(
      sysconfig.get_paths()["purelib"] + "\n")
  return python


_USE_INSTALLED = """
import sys, numpy as np, jax, zipjax, zipjax_experiments
from zipjax import models
from zipjax_experiments import configs
assert zipjax.__file__.startswith(sys.prefix) and zipjax_experiments.__file__.startswith(sys.prefix)
assert configs.load("digits_default").num_runs >= 1
model, spec = models.mlp((16,), num_outputs=3)
x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
va, vb = (model.init(jax.random.key(i), x) for i in (0, 1))
merged = zipjax.zip(va, vb, spec, data=[x])
assert jax.tree.structure(merged) == jax.tree.structure(va)
print("ok")
"""


@pytest.mark.slow  # ~40 s: a virtual environment, pip, and a zip in a fresh process
def test_wheel_installs_into_a_fresh_environment_and_zips(dist, tmp_path):
  python = _fresh_env(tmp_path / "env")
  env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
         "PIP_NO_INDEX": "1", "JAX_PLATFORMS": "cpu"}
  subprocess.run([str(python), "-m", "pip", "install", "-q", f"{_wheel(dist)}[experiments]"],
                 check=True, env=env, cwd=tmp_path)
  out = subprocess.run([str(python), "-c", _USE_INSTALLED], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "ok"


@pytest.mark.slow  # ~90 s: the small quickstart trains and merges with every method
def test_quickstart_installs_the_wheel_and_runs_against_it(dist, tmp_path, monkeypatch):
  env_dir = tmp_path / "env"
  python = _fresh_env(env_dir)
  kernel = tmp_path / "jupyter" / "kernels" / "fresh"
  kernel.mkdir(parents=True)
  (kernel / "kernel.json").write_text(json.dumps({
      "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh", "language": "python"}))

  nb = nbformat.read(ROOT / "colab" / "quickstart.ipynb", as_version=4)
  install = nb.cells[1]
  assert 'ZIPJAX = "zipjax[experiments]"' in install.source
  install.source = install.source.replace(
      'ZIPJAX = "zipjax[experiments]"', f'ZIPJAX = "{_wheel(dist)}[experiments]"')
  nb.cells.append(nbformat.v4.new_code_cell(
      "import zipjax, zipjax_experiments\n"
      f"assert zipjax.__file__.startswith({str(env_dir)!r}), zipjax.__file__\n"
      f"assert zipjax_experiments.__file__.startswith({str(env_dir)!r})\n"))
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  # The kernel inherits this process's environment.
  for var in ("PYTHONPATH", "PIP_FIND_LINKS"):
    monkeypatch.delenv(var, raising=False)
  for var, value in dict(ZIPJAX_NOTEBOOK_SMALL="1", JUPYTER_PATH=str(tmp_path / "jupyter"),
                         JAX_PLATFORMS="cpu", PIP_NO_INDEX="1",
                         PIP_DISABLE_PIP_VERSION_CHECK="1").items():
    monkeypatch.setenv(var, value)
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")  # no network
  nbclient.NotebookClient(nb, timeout=600, kernel_name="fresh",
                          resources={"metadata": {"path": str(run_dir)}}).execute()
  assert (run_dir / "runs" / "quickstart_small" / "results.md").exists()
