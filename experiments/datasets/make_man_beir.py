"""A third long-document retrieval set, in BEIR format, from this machine's own manual pages (section 1).

    python experiments/datasets/make_man_beir.py --out /tmp/man-beir [--seed 0] [--max-docs 600]

Built to check, on pages nobody tuned on, the knowledge base's zero-shot defaults, which were chosen on the tune
halves of gcloud-man and pydoc-stdlib. Documents: a manual page rendered to plain text by ``man`` (80 columns, no
hyphenation or justification), without its NAME section. Query: the page's one-line description from that NAME
section ("copy files and directories"), with any verbatim repetition of it removed from the body: the construction
of gcloud-man, applied to a different corpus (GNU and Debian tools rather than one product's CLI).

Seeded: candidate pages are the files of ``/usr/share/man/man1`` sorted by name and shuffled with ``--seed``; a page
is kept when it renders, has a description of at least three words that no kept page shares, and at least
``--min-chars`` characters of body (so most pages are several chunks long); bodies are cut at ``--max-chars``. The
content depends on the packages installed on the machine that runs the script; the output's README records the count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

_HEADER = re.compile(r"^[A-Z][A-Z0-9 ,/&()-]*$")  # a section header line of a rendered page ("NAME", "SEE ALSO")
_DASH = re.compile(r"\s+[-\u2010\u2012\u2013\u2014]\s+")


def render(path: Path) -> str | None:
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "LC_ALL": "C.UTF-8"}
    try:
        out = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-P", "cat", "-l", str(path)],
                             capture_output=True, text=True, timeout=20, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return re.sub(r".\x08", "", out.stdout)  # overstrike (bold, underline) to plain text


def split_name(text: str) -> tuple[str, str, str] | None:
    """(title, description, body without the NAME section), or None when the page has no usable NAME line."""
    lines = text.splitlines()
    if lines and not _HEADER.match(lines[0].strip()):
        lines = lines[1:]  # the running header ("LS(1)  User Commands  LS(1)")
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "NAME")
    except StopIteration:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith(" ")),
               len(lines))
    name_line = " ".join(" ".join(lines[start + 1:end]).split())
    parts = _DASH.split(name_line, maxsplit=1)
    if len(parts) != 2:
        return None
    title, description = parts[0].strip(), parts[1].strip().rstrip(".")
    body = "\n".join(lines[:start] + lines[end:]).strip()
    if description:
        body = re.sub(re.escape(description), " ", body, flags=re.IGNORECASE)
    return title, description, body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=600)
    ap.add_argument("--min-chars", type=int, default=2500)
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--man-dir", default="/usr/share/man/man1")
    args = ap.parse_args(argv)
    files = sorted(p for p in Path(args.man_dir).iterdir() if p.is_file() and not p.is_symlink())
    random.Random(args.seed).shuffle(files)
    docs, queries, seen = [], [], set()
    tried = 0
    for path in files:
        if len(docs) >= args.max_docs:
            break
        tried += 1
        text = render(path)
        parsed = split_name(text) if text else None
        if parsed is None:
            continue
        _title, description, body = parsed
        key = description.lower()
        if len(description.split()) < 3 or key in seen or len(body) < args.min_chars:
            continue
        seen.add(key)
        i = len(docs)
        docs.append({"_id": f"m{i}", "title": "", "text": body[: args.max_chars]})
        queries.append({"_id": f"q{i}", "text": description})
        if len(docs) % 100 == 0:
            print(f"{len(docs)} pages kept of {tried} tried", file=sys.stderr)
    out = Path(args.out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tm{i}\t1\n" for i in range(len(docs))), encoding="utf-8")
    (out / "README.md").write_text(
        f"# man-beir\n\nMade by `python experiments/datasets/make_man_beir.py {' '.join(argv or sys.argv[1:])}`: "
        f"{len(docs)} pages of {args.man_dir} kept of {tried} tried ({len(files)} files there), seed {args.seed}.\n",
        encoding="utf-8")
    print(f"{out}: {len(docs)} documents, {len(queries)} queries ({tried} pages tried)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
