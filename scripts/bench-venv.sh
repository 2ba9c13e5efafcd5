#!/usr/bin/env bash
# Create (or bring up to date) the benchmark virtual environment, .venv-bench, beside the project's .venv.
#
#   scripts/bench-venv.sh            # then: .venv-bench/bin/python benchmarks/run.py
#
# Why a second venv: the benchmark runs every peer in ONE process, and timm needs torchvision, which does not import
# beside the project's pinned torch==2.13.0. So this venv has torch==2.14.1 + torchvision==0.29.1 (both lie on the
# machines' local disk, so pip takes them from there; it is a CUDA build that runs fine on the CPU, ~5 GB installed),
# timm, torch_geometric and matplotlib, and attnpool itself installed editable with --no-deps (its own pin of torch
# must not be resolved here). attnpool's other runtime dependencies are read from pyproject.toml and installed.
#
# torch is never installed unpinned: an open range would pull a multi-GB CUDA build from the index.
# Idempotent: a stamp records the hash of this script, pyproject.toml and benchmarks/requirements-bench.txt; a
# second run with nothing changed returns at once. Use plain pip (not uv/poetry), as for the main venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
REQS="$ROOT/benchmarks/requirements-bench.txt"
STAMP="$VENV/.attnpool-bench-installed"

want="$(cat "${BASH_SOURCE[0]}" "$ROOT/pyproject.toml" "$REQS" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "bench venv up to date: $VENV"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    # keep the venv out of git without touching the project's .gitignore
    echo '*' > "$VENV/.gitignore"
fi
pip_install() {
    # the machines' pip.conf lists local indexes that lack most projects; pip warns once per project about that
    "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# the peers, with torch and torchvision pinned exactly; the same file constrains the next step, so it cannot move them
pip_install -r "$REQS"

# attnpool's runtime dependencies other than torch, then attnpool itself without dependencies (tomllib: Python 3.11+)
mapfile -t deps < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for d in deps:
    if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() not in ("torch", "torchvision"):
        print(d)
PY
)
if ((${#deps[@]})); then
    pip_install -c "$REQS" "${deps[@]}"
fi
pip_install --no-deps -e "$ROOT"

# fail loudly now rather than in the middle of a benchmark
"$VENV/bin/python" -W ignore::FutureWarning - <<'PY'
import torch, torchvision, timm, torch_geometric, matplotlib, attnpool
print(f"bench venv: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"torch_geometric {torch_geometric.__version__}, matplotlib {matplotlib.__version__}")
PY

echo "$want" > "$STAMP"
echo "bench venv ready in $(( $(date +%s) - start )) s: $VENV ($(du -sh "$VENV" | cut -f1))"
