"""Sphinx configuration of fastamp's documentation site (``make docs``: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "fastamp"
author = "the fastamp developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "fastamp"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Docstrings name torch's and Lightning's objects in text; only fastamp's own must resolve.
nitpicky = False
suppress_warnings = ["myst.header"]
