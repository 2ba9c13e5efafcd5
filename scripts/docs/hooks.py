"""mkdocs hooks: pages that live beside the code, shown on the site without copies.

``benchmarks/`` and ``experiments/`` keep their READMEs and results next to the scripts that write them. The site
mounts those folders under the same paths (``benchmarks/README.md`` becomes the page ``benchmarks/``), so their
relative links between each other (``results/....md``, images) work unchanged. A link from such a page to a file the
site does not hold (a script, ``../src/...``) is shown as the path in code instead of a broken link; links inside
``docs/`` are still checked by ``mkdocs build --strict``.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.attnpool")

ROOT = Path(__file__).resolve().parents[2]
MOUNTED = ("benchmarks", "experiments")
SUFFIXES = {".md", ".png", ".svg", ".jpg", ".json", ".csv"}
MAX_BYTES = 5 * 2**20  # big result files stay in the repository only
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def _mounted_files(config: Any) -> list[File]:
    files = []
    for folder in MOUNTED:
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT)
            if (path.is_file() and path.suffix in SUFFIXES and path.stat().st_size <= MAX_BYTES
                    and not any(part.startswith(".") for part in rel.parts)):
                files.append(File.generated(config, rel.as_posix(), abs_src_path=str(path)))
    return files


def on_files(files: Files, config: Any) -> Files:
    for file in _mounted_files(config):
        if files.get_file_from_path(file.src_uri) is None:
            files.append(file)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src = page.file.src_uri
    if not src.startswith(tuple(f"{folder}/" for folder in MOUNTED)):
        return markdown

    def fix(match: re.Match[str]) -> str:
        target = match.group("target")
        if re.match(r"^[a-z]+:|^#|^/", target):
            return match.group(0)
        path = target.split("#", 1)[0]
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(src), path))
        if files.get_file_from_path(resolved) is not None:
            return match.group(0)
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(src), path))
        log.debug("%s: link to %s (not on the site) shown as its path", src, repo_path)
        text = match.group("text")
        return f"{text} (`{repo_path}` in the repository)" if text.strip("`") != repo_path else f"`{repo_path}`"

    return _LINK.sub(fix, markdown)
