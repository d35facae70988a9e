"""Build the documentation with Sphinx, treating every warning as an error."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sphinx", reason="install the docs extra: pip install -e '.[docs]'")
pytest.importorskip("myst_parser", reason="install the docs extra: pip install -e '.[docs]'")

DOCS = pathlib.Path(__file__).parent.parent / "docs"


def test_docs_build_without_warnings(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-4000:]}"
  api = (tmp_path / "reference" / "api.html").read_text(encoding="utf-8")
  for name in ["ueaj.opt.render", "ueaj.opt.summary", "ueaj.opt.explain", "ueaj.opt.Optimizer.set_hyperparam"]:
    assert f'id="{name}"' in api, f"{name} is missing from the API reference"
