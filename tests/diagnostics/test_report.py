"""Report output: valid JSON, Markdown with the alerts, a self-contained HTML page with figures, the CLI entry."""

import json
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from attnpool.diagnostics import Recording, analyze, capture
from attnpool.diagnostics.report import main
from attnpool.nn import AttentionPool
from tests.diagnostics.scripted import random_sets


@pytest.fixture(scope="module")
def recording():
    torch.manual_seed(0)
    pool = AttentionPool(4, num_queries=2, num_heads=2)
    with torch.no_grad():
        pool.query.zero_()  # collapsed: an alert to report
    sets = random_sets(30)
    with torch.no_grad(), capture(pool) as rec:
        rec.label([[f"tok{j}" for j in range(s.shape[0])] for s in sets])
        pool(sets)
    return rec


def test_json_is_strict_and_complete(recording):
    report = analyze(recording)
    data = json.loads(report.to_json(per_set=True))  # allow_nan=False inside: NaN became null
    assert data["format"] == "attnpool.diagnostics/1"
    assert [a["code"] for a in data["alerts"]] == ["collapse.uniform"]
    assert data["alerts"][0]["cause"] and data["alerts"][0]["fix"]
    module = data["modules"][""]
    assert module["sets"] == 30 and module["heads"] == 2 and module["queries"] == 2
    assert len(module["per_set"]["normalized_entropy"]) == 30
    assert module["means"]["normalized_entropy"] == pytest.approx(1.0)
    assert module["head_redundancy_jsd"][0][1] == pytest.approx(0.0, abs=1e-9)


def test_markdown_lists_alerts_and_signals(recording):
    md = analyze(recording).to_markdown()
    assert "| warning | `(model)` | collapse.uniform |" in md
    assert "normalized entropy (1 = uniform) | 1 |" in md


def test_save_writes_json_markdown_html_and_figures(recording, tmp_path):
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the diagnostics extra)")
    paths = analyze(recording).save(tmp_path)
    assert {"json", "markdown", "html", "m0-histograms.png", "m0-position.png", "m0-heatmap0.png"} <= set(paths)
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<script" not in page and "http" not in page
    assert "collapse.uniform" in page
    assert paths["m0-heatmap0.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![m0-position.png](m0-position.png)" in paths["markdown"].read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_writes_the_report_of_a_saved_capture(recording, tmp_path, capsys):
    recording.save(tmp_path / "cap.pt")
    code = main([str(tmp_path / "cap.pt"), "--out", str(tmp_path / "out"), "--no-png", "--no-html"])
    assert code == 0  # warnings only: no critical alert
    assert "collapse.uniform" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["modules"][""]["sets"] == 30
    assert Recording.load(tmp_path / "cap.pt").calls[0].labels[0][:2] == ["tok0", "tok1"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium_without_console_errors(recording, tmp_path):
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the diagnostics extra)")
    paths = analyze(recording).save(tmp_path)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,1600", paths["html"].as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    # chromium logs every console message (console.error, uncaught exceptions) as an ":CONSOLE" line; the page has
    # no script, so any such line is an error
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console


def test_module_entry_point_runs(recording, tmp_path, monkeypatch):
    recording.save(tmp_path / "cap.pt")
    argv = ["attnpool.diagnostics", str(tmp_path / "cap.pt"), "--out", str(tmp_path / "o"), "--no-png", "--no-html"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("attnpool.diagnostics", run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "o" / "report.md").exists()


def test_a_comparison_is_bundled_into_the_report(recording, tmp_path):
    from attnpool.compare import compare

    result = compare(lambda pool, seed: [float(type(pool).__name__ == "MaxPool"), 0.5, 0.25], ["mean", "max"], dim=4,
                     n_boot=200, progress=False)
    report = analyze(recording, comparison=result)
    assert json.loads(report.to_json())["comparison"]["results"]["max"]["value"] == pytest.approx(0.25 + 1 / 3)
    assert "## Pooling comparison" in report.to_markdown()
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the diagnostics extra)")
    paths = report.save(tmp_path)
    assert "comparison.png" in paths and "<h2>Pooling comparison</h2>" in paths["html"].read_text()


def test_importing_diagnostics_and_compare_loads_no_optional_dependency():
    # torch itself imports tqdm (torch.hub), so compare with what `import torch` loads
    code = ("import sys, torch; before = set(sys.modules); "
            "import attnpool, attnpool.diagnostics, attnpool.compare; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new & {'matplotlib', 'tqdm', 'PIL', 'scipy', 'pandas'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]"


def test_attnpool_report_subcommand(recording, tmp_path, capsys):
    from attnpool.cli import main as attnpool_main

    recording.save(tmp_path / "cap.pt")
    assert attnpool_main(["report", str(tmp_path / "cap.pt"), "--out", str(tmp_path / "r"), "--no-png",
                          "--no-html"]) == 0
    assert "collapse.uniform" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.json").exists()
