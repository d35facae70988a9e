"""Sphinx configuration: the user guide (Markdown) and the API reference from docstrings.

Build with `sphinx-build -W -b html docs <output folder>`; warnings are errors.
"""

import pathlib
import re
import sys

# Import the package from this checkout, installed or not.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

project = "ueaj"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

# Docstrings follow the Google style. Attributes become fields of their
# class, so NamedTuple fields are not described twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# Anchors for links such as indexing.md#errors.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "ueaj"

# Docstrings mark code with single backticks, as Markdown does.
_CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _code_span(match: re.Match) -> str:
  # reStructuredText needs a non-word character after a literal, so
  # "`Array`s" becomes "``Array``\ s".
  following = match.string[match.end() : match.end() + 1]
  escape = "\\ " if following.isalnum() else ""
  return f"``{match.group(1)}``{escape}"


def _literal_code_spans(app, what, name, obj, options, lines):
  """Turn single-backtick code spans into reStructuredText literals, outside doctests."""
  in_doctest = False
  for number, line in enumerate(lines):
    stripped = line.strip()
    if stripped.startswith(">>>"):
      in_doctest = True
    elif not stripped:
      in_doctest = False
    if not in_doctest:
      lines[number] = _CODE_SPAN.sub(_code_span, line)


def setup(app):
  app.connect("autodoc-process-docstring", _literal_code_spans)
