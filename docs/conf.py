"""Sphinx configuration of the pyro_slots documentation (API reference + executed tutorials).

``make docs`` builds everything; ``make docs-fast`` (what CI runs, with warnings as errors)
sets ``PYRO_SLOTS_DOCS_FAST=1``, which the tutorials read to shrink their sizes.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(".."))

import pyro_slots  # noqa: E402

project = "pyro_slots"
author = "the pyro_slots developers"
copyright = "the pyro_slots developers"
release = pyro_slots.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "description"
autodoc_inherit_docstrings = False

FAST = os.environ.get("PYRO_SLOTS_DOCS_FAST") == "1"

sphinx_gallery_conf = {
    "examples_dirs": "tutorials",
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py|_helpers\.py",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_memory": False,
    "min_reported_time": 1,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "first_notebook_cell": None,
}

# Tutorials print warnings the reader should see; the build only fails on Sphinx's own.
warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently using agg")

templates_path = []
exclude_patterns = [
    "_build",
    "tutorials/README.rst",  # sphinx-gallery reads it itself
    "auto_tutorials/*.ipynb",
    "auto_tutorials/*.py",
    "**/*.zip",
]
html_theme = "furo"
html_title = f"pyro_slots {release}"
html_static_path = []
pygments_style = "sphinx"
