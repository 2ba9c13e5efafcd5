"""The documentation site builds with ``mkdocs build --strict`` (a warning is an error: a broken link, an unknown
cross-reference, a docstring griffe cannot parse, a missing snippet), and the code it shows is the code CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pages whose Python code must come from examples/ (runnable, tested by tests/test_examples.py).
CODE_PAGES = [ROOT / "docs" / "index.md", ROOT / "docs" / "concepts.md",
              *sorted((ROOT / "docs" / "migration").glob("*.md"))]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')


def test_site_builds_strict(tmp_path: Path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed: "
                        "pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    site = tmp_path / "site"
    # the API reference was generated from the docstrings, and the examples were included
    api = (site / "api" / "nn" / "index.html").read_text(encoding="utf-8")
    assert 'id="attnpool.nn.AttentionPool"' in api
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "--8&lt;--" not in home and "8<--" not in home
    assert "mean_pool" in home and "offsets" in home
    # the pages mounted from benchmarks/ and experiments/ (a README.md is its folder's index page)
    assert "attnpool against its peers" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert (site / "experiments" / "index.html").is_file()


@pytest.mark.parametrize("page", CODE_PAGES, ids=[p.relative_to(ROOT / "docs").as_posix() for p in CODE_PAGES])
def test_python_blocks_are_tested_snippets(page: Path):
    """Every ```python block of the page is one include of a section of a script that CI runs."""
    text = page.read_text(encoding="utf-8")
    for block in _FENCE.findall(text):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        assert len(lines) == 1, f"{page.name}: a python block that is not a snippet of examples/:\n{block}"
        m = _SNIPPET.match(lines[0].strip())
        assert m, f"{page.name}: expected --8<-- \"examples/FILE.py:section\", got {lines[0]!r}"
        path = ROOT / m["path"]
        assert path.is_file() and m["path"].startswith(("examples/", "experiments/")), m["path"]
        if m["section"]:
            source = path.read_text(encoding="utf-8")
            for mark in ("start", "end"):
                assert f"# --8<-- [{mark}:{m['section']}]" in source, f"{m['path']} has no {mark} of {m['section']}"
