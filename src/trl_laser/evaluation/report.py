"""How results are shown: text tables, the one-line verdict, the paper's markdown table and the PNG plots.

The only module of the package that imports matplotlib (through `Figure`, never pyplot: the caller's backend is left
alone).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from ..metrics import self_verification_metrics
from .summary import SUMMARY_KEYS, TABLE_METRICS


def plot_reliability(
    scores: Sequence[float | None], labels: Sequence[bool], path: str | os.PathLike, num_bins: int = 10
) -> None:
    """Reliability diagram of clamp(r_s, 0, 1) against correctness (the bins of the ECE), with a count histogram."""
    pairs = [(min(max(float(s), 0.0), 1.0), bool(y)) for s, y in zip(scores, labels) if s is not None]
    width = 1.0 / num_bins
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(num_bins)]
    for c, y in pairs:
        bins[min(int(c * num_bins), num_bins - 1)].append((c, y))
    centers = [(b + 0.5) * width for b in range(num_bins)]
    acc = [sum(y for _, y in b) / len(b) if b else 0.0 for b in bins]
    conf = [sum(c for c, _ in b) / len(b) if b else math.nan for b in bins]
    ece = self_verification_metrics(scores, labels, num_bins=num_bins)["ece"]

    fig = Figure(figsize=(5, 6))  # no pyplot: the caller's matplotlib backend is left alone
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(centers, acc, width=width * 0.9, color="tab:blue", alpha=0.8, label="accuracy in bin")
    top.plot(centers, conf, "o", color="tab:red", label="mean clamp(r_s, 0, 1)")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("fraction correct")
    title = "Reliability of the self-reward score"
    top.set_title(f"{title} (ECE {ece:.3f})" if ece is not None else f"{title} (no finished samples)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [len(b) for b in bins], width=width * 0.9, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("clamp(r_s, 0, 1)")
    bottom.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_scaling(curves: dict[str, list[float | None]], path: str | os.PathLike) -> None:
    """Accuracy of majority, weighted and best-of-N against the number of samples (inference-time scaling)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    labels = {
        "majority": ("majority vote", "o-", "tab:blue"),
        "weighted": ("weighted vote (r_s)", "o-", "tab:red"),
        "best_of_n": ("best-of-N (r_s)", "o-", "tab:green"),
        "weighted_mean_token_logprob": ("weighted vote (mean token log-prob)", "s:", "tab:red"),
        "best_of_n_mean_token_logprob": ("best-of-N (mean token log-prob)", "s:", "tab:green"),
    }
    for key, (label, style, color) in labels.items():
        if key in curves:  # curves of older evaluations lack the log-prob votes
            ax.plot(curves["k"], [math.nan if v is None else v for v in curves[key]], style, color=color, label=label)
    ax.plot(curves["k"], [math.nan if v is None else v for v in curves["sample_accuracy"]], "--", color="gray")
    ax.plot([], [], "--", color="gray", label="single-sample accuracy")
    ax.set_xlabel("samples per problem (k)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(curves["k"] if len(curves["k"]) <= 16 else ax.get_xticks())
    ax.set_xlim(0.5, max(curves["k"]) + 0.5)
    ax.set_title("Inference-time scaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def plot_benchmark(records: Sequence[dict], scaling: dict[str, list[float | None]], folder: str) -> None:
    """`reliability.png` and `scaling.png` of one benchmark's records into `folder`."""
    scores, labels = [r["self_reward"] for r in records], [r["correct"] for r in records]
    plot_reliability(scores, labels, os.path.join(folder, "reliability.png"))
    plot_scaling(scaling, os.path.join(folder, "scaling.png"))


def format_table(summary: dict[str, Any]) -> str:
    """The summary as text: one metric a row (all samples beside the "answer extracted" subset), then the LaSeR
    score beside the free confidence signals on the scored samples (AUROC overall, within a problem, per band)."""
    rows = [("metric", "all", "answer extracted")]
    for key in SUMMARY_KEYS:
        rows.append((key, _cell(summary.get(key)), _cell(summary["filtered"].get(key))))
    tables = [_text_table(rows)]
    if "baselines" in summary:
        signals = {"laser r_s": summary, **summary["baselines"]}
        tables.append(
            f"ranking of right above wrong ({summary['n_scored']} scored samples), with the free confidence signals:\n"
            + signal_table(signals, extra=("weighted_at_n", "best_of_n"))
        )
    return "\n\n".join(tables)


def verdict(summary: dict[str, Any]) -> str:
    """Three lines: does the LaSeR score rank right answers above wrong ones (over all samples, and among the answers
    to one problem), better than the free signal, and does a vote weighted by it beat majority voting?"""
    free = summary.get("baselines", {}).get("mean_token_logprob", {})
    laser = summary.get("auroc")
    if laser is None:
        return "Self-verification: no AUROC (the scored samples are all right or all wrong)."
    lines = [f"Self-verification on {summary['n_scored']} scored samples: LaSeR AUROC {laser:.3f}"]
    lines[0] += "." if free.get("auroc") is None else f" {_versus(laser, free['auroc'])}."
    within, free_within = summary.get("auroc_within_problem"), free.get("auroc_within_problem")
    if within is not None:
        uncertainty = summary.get("within_problem_uncertainty") or {}
        versus = "" if free_within is None else f" {_versus(within, free_within, uncertainty)}"
        lines.append(f"Within a problem (what best-of-N and weighted voting need): LaSeR AUROC {within:.3f}{versus}.")
    weighted, majority = summary.get("weighted_at_n"), summary.get("majority_at_n")
    if None not in (weighted, majority):
        better = "beats" if weighted > majority else "does not beat"
        lines.append(
            f"Voting: weighted by the score {weighted:.3f} {better} majority {majority:.3f} ({weighted - majority:+.3f});"
            f" best-of-N by the score {summary.get('best_of_n', 0.0):.3f}."
        )
    return "\n".join(lines)


def _versus(laser: float, free: float, uncertainty: dict | None = None) -> str:
    """`uncertainty` (a summary's `within_problem_uncertainty`) adds the lead's bootstrap interval over problems."""
    better = "beats" if laser > free else "does not beat"
    lead = (uncertainty or {}).get("lead_over_mean_token_logprob_interval")
    spread = (
        ""
        if lead is None
        else f"; 95% interval {lead[0]:+.3f} to {lead[1]:+.3f} over {uncertainty['problems']} problems"
    )
    return f"{better} the free mean token log-prob ({free:.3f}, {laser - free:+.3f}{spread})"


def signal_table(signals: dict[str, dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """One row per signal: AUROC overall, within a problem, per band (when there are bands), then the `extra` keys."""
    bands = next((list(v["auroc_by_band"]) for v in signals.values() if v.get("auroc_by_band")), [])
    rows = [("signal", "auroc", "within problem", *(f"auroc {b}" for b in bands), *extra)]
    for name, values in signals.items():
        by_band = values.get("auroc_by_band") or {}
        rows.append(
            (
                name,
                _cell(values.get("auroc")),
                _cell(values.get("auroc_within_problem")),
                *(_cell(by_band.get(b)) for b in bands),
                *(_cell(values.get(k)) for k in extra),
            )
        )
    return _text_table(rows)


def _text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_markdown(table: dict[str, Any], protocol: str) -> str:
    """The paper's table layout: one column per benchmark and "Avg.", one row per metric (accuracy and F1 in %)."""
    names = list(table["benchmarks"])
    lines = [
        f"# Evaluation results (protocol: {protocol})",
        "",
        "| | " + " | ".join(f"{n} (n={table['benchmarks'][n]['n']})" for n in names) + " | Avg. |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for key, label in TABLE_METRICS.items():
        percent = key in ("accuracy", "sv_f1_paper")
        cells = [table["benchmarks"][n][key] for n in names] + [table["average"][key]]
        lines.append(
            f"| {label}{' (%)' if percent else ''} | " + " | ".join(_md_cell(v, percent) for v in cells) + " |"
        )
    lines += [
        "",
        "Accuracy: mean over all samples. Self-verification F1: 2 TPR TNR / (TPR + TNR) at r_s > 0.5 (the paper's). "
        "ECE: 10 equal-width bins of clamp(r_s, 0, 1). Avg.: the plain mean over the benchmarks.",
    ]
    return "\n".join(lines) + "\n"


def _md_cell(value: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"
