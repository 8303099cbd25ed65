"""Sphinx configuration of the zipjax documentation.

Build (from the repository root, with the ``docs`` extra installed)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Sphinx with MyST (Markdown pages), autodoc and napoleon (the API reference from the Google-style
docstrings) and myst-nb (the Colab notebooks, rendered as committed, not executed).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zipjax  # noqa: E402  pylint: disable=wrong-import-position

project = "zipjax"
author = "the zipjax authors"
release = version = zipjax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "README.md"]
html_theme = "sphinx_book_theme"
html_title = "zipjax"
html_theme_options = {"show_toc_level": 2}

# MyST: ``` fences are code, $ math is left alone, headings get anchors for links.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are committed without outputs; CI executes them

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Arguments", "params_style")]
napoleon_use_ivar = True  # Attributes: as fields, not as a second entry per attribute
add_module_names = False

# The notebooks live in colab/ (where Colab opens them); render copies of them here.
_NOTEBOOKS = pathlib.Path(__file__).resolve().parent / "notebooks"
_NOTEBOOKS.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "colab").glob("*.ipynb")):
  shutil.copyfile(_nb, _NOTEBOOKS / _nb.name)
