"""The diagnostics report: per-module signals and alerts, as JSON for machines and Markdown or a self-contained HTML
page (with figures, when matplotlib is installed) for people."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnpool.diagnostics.alerts import RULES, Alert, Thresholds, check
from attnpool.diagnostics.analysis import ModuleSummary, summarize
from attnpool.diagnostics.capture import Recording
from attnpool.diagnostics.faithfulness import Faithfulness

if TYPE_CHECKING:
    from attnpool.compare import Comparison

__all__ = ["Report", "analyze", "main"]

FORMAT = "attnpool.diagnostics/1"


@dataclass
class Report:
    """Signals and alerts of every recorded module. ``str(report)`` is the Markdown."""

    modules: dict[str, ModuleSummary]
    alerts: list[Alert]
    thresholds: Thresholds
    faithfulness: list[Faithfulness] = field(default_factory=list)
    #: a :class:`attnpool.compare.Comparison` to show beside the signals
    comparison: Comparison | None = None
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def alerts_of(self, module: str | None = None, severity: str | None = None) -> list[Alert]:
        return [a for a in self.alerts if (module is None or a.module == module)
                and (severity is None or a.severity == severity)]

    @property
    def codes(self) -> set[str]:
        """The codes of every alert raised, e.g. ``{"collapse.uniform"}``."""
        return {a.code for a in self.alerts}

    # -- JSON -----------------------------------------------------------------------------------------------------

    def to_dict(self, per_set: bool = False) -> dict[str, Any]:
        return {"format": FORMAT, "created": self.created, "thresholds": vars(self.thresholds),
                "alerts": [a.to_dict() for a in self.alerts],
                "modules": {n: s.to_dict(per_set) for n, s in self.modules.items()},
                "faithfulness": [f.to_dict() for f in self.faithfulness],
                "comparison": None if self.comparison is None else self.comparison.to_dict()}

    def to_json(self, per_set: bool = False, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(per_set), indent=indent, allow_nan=False)

    # -- Markdown -------------------------------------------------------------------------------------------------

    def to_markdown(self) -> str:
        out = [f"# Attention pooling diagnostics\n\n{self.created}, {len(self.modules)} module(s).\n", "## Alerts\n"]
        if self.alerts:
            out.append("| severity | module | alert | finding | likely cause | usual fix |")
            out.append("|---|---|---|---|---|---|")
            for a in self.alerts:
                out.append(f"| {a.severity} | `{a.module or '(model)'}` | {a.code} | {_md(a.message)} | "
                           f"{_md(a.rule.cause)} | {_md(a.rule.fix)} |")
        else:
            out.append("None.")
        for name, s in self.modules.items():
            out.append(f"\n## `{name or '(model)'}` ({s.module_type})\n")
            out.append(_module_lines(s))
        if self.faithfulness:
            out.append("\n## Faithfulness\n")
            out.append("| module | k | sets | change, top-k removed | change, random k removed | ratio [95% CI] | "
                       "top > random |")
            out.append("|---|---|---|---|---|---|---|")
            for f in self.faithfulness:
                d = f.to_dict()
                out.append(f"| `{f.module}` | {f.k} | {f.num_sets} | {_num(d['top_drop_mean'])} | "
                           f"{_num(d['random_drop_mean'])} | {_num(f.ratio)} [{_num(f.ratio_ci[0])}, "
                           f"{_num(f.ratio_ci[1])}] | {f.win_rate:.0%} |")
        if self.comparison is not None:
            out.append("\n## Pooling comparison\n")
            out.append(self.comparison.to_markdown())
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    # -- HTML and files -------------------------------------------------------------------------------------------

    def figures(self, max_examples: int = 4) -> dict[str, bytes]:
        """PNG figures by file name: per module a heatmap per example set, histograms and position curves.
        Needs matplotlib."""
        from attnpool.diagnostics import plots

        figs: dict[str, bytes] = {}
        if self.comparison is not None and self.comparison.results:
            figs["comparison.png"] = plots.figure_png(plots.comparison_chart(self.comparison))
        for i, (name, s) in enumerate(self.modules.items()):
            if s.num_sets == 0:
                continue
            stem = f"m{i}"
            figs[f"{stem}-histograms.png"] = plots.figure_png(plots.histograms(s))
            figs[f"{stem}-position.png"] = plots.figure_png(plots.position_curves(s))
            for j, ex in enumerate(s.examples[:max_examples]):
                title = f"{name or '(model)'}: call {ex.call}, set {ex.index}"
                figs[f"{stem}-heatmap{j}.png"] = plots.figure_png(plots.heatmap(ex, title))
        return figs

    def to_html(self, figures: dict[str, bytes] | None = None) -> str:
        """A self-contained page (figures inlined as base64 PNG, no script). ``figures=None`` renders them when
        matplotlib is installed and leaves them out otherwise."""
        if figures is None:
            try:
                figures = self.figures()
            except ImportError:
                figures = {}
        e = html.escape
        parts = [_HTML_HEAD.format(title="Attention pooling diagnostics"),
                 f"<h1>Attention pooling diagnostics</h1><p class='meta'>{e(self.created)}, "
                 f"{len(self.modules)} module(s)</p>", "<h2>Alerts</h2>"]
        if self.alerts:
            parts.append("<table><tr><th>severity</th><th>module</th><th>alert</th><th>finding</th>"
                         "<th>likely cause</th><th>usual fix</th></tr>")
            for a in self.alerts:
                parts.append(f"<tr class='{a.severity}'><td>{a.severity}</td><td><code>{e(a.module or '(model)')}"
                             f"</code></td><td>{e(a.code)}</td><td>{e(a.message)}</td><td>{e(a.rule.cause)}</td>"
                             f"<td>{e(a.rule.fix)}</td></tr>")
            parts.append("</table>")
        else:
            parts.append("<p>None.</p>")
        for i, (name, s) in enumerate(self.modules.items()):
            parts.append(f"<h2><code>{e(name or '(model)')}</code> ({e(s.module_type)})</h2>")
            parts.append(_html_module(s))
            for key in sorted((k for k in figures if k.startswith(f"m{i}-")), key=_figure_order):
                parts.append(_img(key, figures[key]))
        if self.faithfulness:
            parts.append("<h2>Faithfulness</h2><table><tr><th>module</th><th>k</th><th>sets</th><th>ratio</th>"
                         "<th>95% CI</th><th>top &gt; random</th></tr>")
            for f in self.faithfulness:
                parts.append(f"<tr><td><code>{e(f.module)}</code></td><td>{f.k}</td><td>{f.num_sets}</td>"
                             f"<td>{_num(f.ratio)}</td><td>{_num(f.ratio_ci[0])} to {_num(f.ratio_ci[1])}</td>"
                             f"<td>{f.win_rate:.0%}</td></tr>")
            parts.append("</table>")
        c = self.comparison
        if c is not None:
            pct = round(c.confidence * 100)
            parts.append(f"<h2>Pooling comparison</h2><p>{e(c.metric_name)} "
                         f"({'higher' if c.higher_is_better else 'lower'} is better) on {c.num_examples} examples; "
                         f"{pct}% bootstrap intervals, differences paired against <code>{e(str(c.baseline))}</code>."
                         f"</p><table><tr><th>pooling</th><th>{e(c.metric_name)}</th><th>{pct}% CI</th>"
                         f"<th>difference</th><th>{pct}% CI</th><th>P(better)</th></tr>")
            for n, r in c.results.items():
                d = c.differences.get(n)
                diff = ("<td>baseline</td><td></td><td></td>" if d is None else
                        f"<td>{d.value:+.4g}</td><td>{d.ci[0]:+.4g} to {d.ci[1]:+.4g}</td><td>{d.prob_better:.2f}</td>")
                parts.append(f"<tr><td>{e(n)}</td><td>{r.value:.4g}</td><td>{r.ci[0]:.4g} to {r.ci[1]:.4g}</td>"
                             f"{diff}</tr>")
            parts.append("</table>")
            if "comparison.png" in figures:
                parts.append(_img("comparison.png", figures["comparison.png"]))
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def save(self, out_dir: str | os.PathLike[str], *, html_page: bool = True, png: bool = True,
             per_set: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and (with matplotlib) ``report.html`` and the PNG figures into
        ``out_dir``. Returns the paths written, by kind."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md"}
        _write(paths["json"], self.to_json(per_set=per_set))
        figures: dict[str, bytes] = {}
        if html_page or png:
            try:
                figures = self.figures()
            except ImportError:
                figures = {}
        md = self.to_markdown()
        if png and figures:
            md += "\n## Figures\n\n" + "\n".join(f"![{k}]({k})" for k in sorted(figures)) + "\n"
            for key, data in figures.items():
                (out / key).write_bytes(data)
                paths[key] = out / key
        _write(paths["markdown"], md)
        if html_page:
            paths["html"] = out / "report.html"
            _write(paths["html"], self.to_html(figures))
        return paths


def _figure_order(key: str) -> tuple[int, str]:
    kinds = ("histograms", "position", "heatmap")
    return next((i for i, k in enumerate(kinds) if k in key), len(kinds)), key


def _img(key: str, data: bytes) -> str:
    return f"<img alt='{html.escape(key)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(s: ModuleSummary) -> list[tuple[str, str]]:
    m, d = s.means, s.to_dict()
    size = d["set_size"] or {}
    qs = s.query_sensitivity
    return [
        ("calls / sets (≥ 2 elements)", f"{s.num_calls} / {s.num_sets} ({s.informative_sets})"),
        ("layouts; heads x queries", f"{', '.join(s.layouts)}; {s.num_heads} x {s.num_queries}"
                                     + (" (self-attention)" if s.self_attention else "")),
        ("set size min / median / max", f"{size.get('min', 'n/a')} / {_num(size.get('median'))} / "
                                        f"{size.get('max', 'n/a')}"),
        ("normalized entropy (1 = uniform)", _num(m["normalized_entropy"])),
        ("effective N; as a fraction of the set", f"{_num(m['effective_count'])}; {_num(m['effective_fraction'])}"),
        (f"max weight; top-{s.topk} mass; Gini", f"{_num(m['max_weight'])}; {_num(m['topk_mass'])}; "
                                                 f"{_num(m['gini'])}"),
        ("near-uniform / near one-hot share", f"{_num(s.collapse['uniform_share'])} / "
                                              f"{_num(s.collapse['one_hot_share'])}"),
        ("top on first / last element (chance)", f"{_num(s.position['top_first_rate'])} / "
                                                 f"{_num(s.position['top_last_rate'])} "
                                                 f"({_num(s.position['chance_rate'])})"),
        ("position centroid (0.5 = none)", _num(s.position["centroid"])),
        ("query sensitivity (bits)", f"{_num(qs['mean'])} over {qs['within_call_sets'] + qs['across_call_sets']} "
                                     "sets"),
        ("masked mass; max sum error", f"{_num(s.leakage['max_masked_mass'])}; {_num(s.leakage['max_sum_error'])}"),
    ]


def _module_lines(s: ModuleSummary) -> str:
    lines = ["| signal | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in _rows(s)]]
    if s.num_heads > 1:
        ent = ", ".join(_num(x) for x in s.per_head["normalized_entropy"])
        lines.append(f"| per-head normalized entropy | {ent} |")
    return "\n".join(lines)


def _html_module(s: ModuleSummary) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _rows(s))
    return f"<table class='kv'>{rows}</table>"


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 75em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }}
tr.critical td:first-child {{ background: #f4b6b6; }} tr.warning td:first-child {{ background: #f8e3a3; }}
tr.info td:first-child {{ background: #d7e6f5; }} .meta {{ color: #666; }}
img {{ display: block; max-width: 100%; margin: 0.5em 0; }}
</style></head><body>"""


def analyze(recording: Recording, *, thresholds: Thresholds | None = None,
            faithfulness: Sequence[Faithfulness] = (), comparison: Comparison | None = None, topk: int = 3,
            max_positions: int = 16, bins: int = 10, num_examples: int = 4) -> Report:
    """Signals and alerts of every module in ``recording`` (and of the given :func:`faithfulness` results).

    ``comparison`` (from :func:`attnpool.compare.compare`) is shown in the report beside them; ``topk`` is the k of
    the top-k mass, ``max_positions`` and ``bins`` shape the position-bias curves, ``num_examples`` sets per module
    get a heatmap."""
    t = thresholds or Thresholds()
    modules = summarize(recording, topk=topk, max_positions=max_positions, bins=bins,
                        uniform_entropy=t.uniform_entropy, one_hot_weight=t.one_hot_weight,
                        position_min_size=t.position_min_size, num_examples=num_examples)
    alerts = [a for s in modules.values() for a in check(s, t, list(faithfulness))]
    known = set(modules)
    for f in faithfulness:
        if f.module not in known and f.ratio == f.ratio and f.ratio < t.faithfulness_ratio:
            alerts.append(Alert("faithfulness.low", RULES["faithfulness.low"].severity, f.module,
                                f"top-{f.k} removal changes the output {f.ratio:.2f}x as much as random removal",
                                f.ratio, t.faithfulness_ratio))
    order = ("critical", "warning", "info")
    alerts.sort(key=lambda a: order.index(a.severity))
    return Report(modules, alerts, t, list(faithfulness), comparison)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``attnpool report`` (for :mod:`attnpool.cli` to reuse); run them with :func:`run`."""
    parser.add_argument("capture", help="a file written by Recording.save")
    parser.add_argument("--out", default="attnpool-report", help="output folder (default: %(default)s)")
    parser.add_argument("--no-html", action="store_true", help="skip report.html")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG figures")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report of ``args.capture`` into ``args.out``; print the alerts. Exit code 1 on a critical alert."""
    report = analyze(Recording.load(args.capture))
    paths = report.save(args.out, html_page=not args.no_html, png=not args.no_png)
    for a in report.alerts:
        print(a)
    print(f"wrote {', '.join(str(v) for k, v in paths.items() if k in ('json', 'markdown', 'html'))}",
          file=sys.stderr)
    return 1 if report.alerts_of(severity="critical") else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnpool.diagnostics CAPTURE --out DIR``: the report of a capture saved with
    :meth:`Recording.save` (JSON, Markdown, and HTML and PNG figures when matplotlib is installed)."""
    parser = argparse.ArgumentParser(prog="attnpool report", description="Write the diagnostics report (JSON, "
                                     "Markdown, HTML and PNG figures when matplotlib is installed) for a saved "
                                     "capture.")
    return run(add_arguments(parser).parse_args(argv))
