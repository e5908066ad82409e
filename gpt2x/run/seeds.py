"""Seeds as a sweep dimension: the runs of a sweep that differ only in `seed` are one configuration.

One seed proves nothing, so the sweep report (gpt2x/report.py) groups a multirun's runs by configuration and gives,
per configuration, n and mean ± std (sample std, n-1) of ms/batch, final val loss, tokens to target and time to
target; against a baseline configuration (`report_baseline`, default the first) the speed-up with its spread and
Welch's t-test p-value; and the speedrunner's plot: val loss against tokens and against training wall time, the mean
over seeds with a ± std band per configuration, the target as a horizontal line.

The speed-up and p-value are on time to target when the sweep has a target (runs that missed it are left out and
counted in the `reached` column), else on ms/batch. Speed-up = baseline mean / this mean; its spread is the
first-order propagation of both stds: speed-up x sqrt((s_b / m_b)^2 + (s / m)^2).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

# per-configuration figures: summary key -> (column title, report.FORMATS kind)
GROUP_METRICS = {
    "ms_per_batch": ("ms/batch", "ms"),
    "final_val_loss": ("final val loss", "loss"),
    "tokens_to_target": ("tokens to target", "int"),
    "time_to_target_s": ("time to target", "s"),
}

GROUP_CSV_COLUMNS = (
    "config", "n", "failed", "seeds", "reached",
    *(f"{k}_{stat}" for k in GROUP_METRICS for stat in ("mean", "std")),
    "compared_on", "speedup", "speedup_std", "p_value", "baseline",
)  # fmt: skip

log = logging.getLogger(__name__)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None for fewer than 2 values; both None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch's t-test p-value (unequal variances); None when either side has fewer than 2 runs."""
    if len(a) < 2 or len(b) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:  # optional (gpt2x[sweep]): the report goes on without p-values
        log.warning("p-values need scipy: pip install 'gpt2x[sweep]' (in a clone: pip install -e '.[sweep]')")
        return None
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p  # nan: both sides without any spread


def speedup_with_spread(base: list[float], other: list[float]) -> tuple[float | None, float | None]:
    """mean(base) / mean(other) and its first-order spread from both sides' stds (None where undefined)."""
    (mb, sb), (mo, so) = mean_std(base), mean_std(other)
    if not mb or not mo:
        return None, None
    ratio = mb / mo
    if sb is None or so is None:
        return ratio, None
    return ratio, ratio * math.hypot(sb / mb, so / mo)


def group_runs(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Report rows by configuration (their `config` label), in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    return groups


def compare_groups(rows: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per configuration (GROUP_CSV_COLUMNS), compared against `baseline`: the `config` label of some rows
    (report.build_rows checks it), or None for the first configuration."""
    groups = group_runs(rows)
    has_target = any(r.get("target_val_loss") is not None for r in rows)
    metric = "time_to_target_s" if has_target else "ms_per_batch"
    base_label = baseline or next(iter(groups), None)

    def values(label: str, key: str) -> list[float]:
        return [r[key] for r in groups[label] if r["status"] == "ok" and r.get(key) is not None]

    out = []
    for label, runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        row: dict[str, Any] = {
            "config": label,
            "n": len(ok),
            "failed": len(runs) - len(ok),
            "seeds": " ".join(str(r["seed"]) for r in ok),
            "reached": sum(r.get("step_to_target") is not None for r in ok) if has_target else None,
            "compared_on": metric,
            "baseline": base_label,
        }
        for key in GROUP_METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values(label, key))
        base, mine = values(base_label, metric), values(label, metric)
        if label == base_label:  # against itself: 1 by definition, with no spread or test
            row["speedup"], row["speedup_std"], row["p_value"] = (1.0 if mine else None), None, None
        else:
            row["speedup"], row["speedup_std"] = speedup_with_spread(base, mine)
            row["p_value"] = welch_p_value(base, mine)
        out.append(row)
    return out


def render_groups_markdown(groups: list[dict[str, Any]], fmt) -> str:
    """The per-configuration table; `fmt(value, kind)` is the report's number formatter."""
    if not groups:
        return ""
    has_target = groups[0]["reached"] is not None
    metric = "time to target" if has_target else "ms/batch"
    lines = [
        "## Per configuration, over seeds",
        "",
        f"Mean ± std over the runs that differ only in seed. Speed-up (± first-order spread) and Welch's t-test "
        f"p-value on {metric}, against `{groups[0]['baseline']}`.",
        "",
    ]
    keys = [k for k in GROUP_METRICS if has_target or "target" not in k]
    header = ["configuration", "n", *(["reached"] if has_target else []), *(GROUP_METRICS[k][0] for k in keys)]
    lines.append("| " + " | ".join([*header, "speed-up", "p"]) + " |")
    lines.append("|---|" + "---:|" * (len(header) + 1))
    for g in groups:
        cells = [g["config"], str(g["n"]) + (f" (+{g['failed']} failed)" if g["failed"] else "")]
        if has_target:
            cells.append(f"{g['reached']}/{g['n']}")
        for k in keys:
            kind = GROUP_METRICS[k][1]
            mean, std = g[f"{k}_mean"], g[f"{k}_std"]
            cells.append(fmt(mean, kind) + (f" ± {fmt(std, kind)}" if std is not None else ""))
        spread = f" ± {g['speedup_std']:.2f}" if g["speedup_std"] is not None else ""
        cells.append(fmt(g["speedup"], "x") + spread if g["speedup"] is not None else "-")
        cells.append("-" if g["p_value"] is None else f"{g['p_value']:.3g}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def val_curve(run_dir: Path, tokens_per_step: int | None) -> list[dict[str, float]]:
    """A run's evaluations from metrics.jsonl: step, tokens, train_time_s (None in runs older than it), val_loss."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "val_loss" in row:
            tokens = row.get("tokens", row["step"] * tokens_per_step if tokens_per_step else None)
            points.append({"step": row["step"], "tokens": tokens, "train_time_s": row.get("train_time_s"),
                           "val_loss": row["val_loss"]})  # fmt: skip
    return points


def mean_curve(curves: list[list[dict[str, float]]], x: str) -> tuple[list[float], list[float], list[float]]:
    """Per eval step: mean x, mean val loss and its std over the runs that evaluated there (0 with one run)."""
    by_step: dict[int, list[dict[str, float]]] = {}
    for curve in curves:
        for p in curve:
            if p[x] is not None:
                by_step.setdefault(p["step"], []).append(p)
    xs, means, stds = [], [], []
    for step in sorted(by_step):
        points = by_step[step]
        xs.append(statistics.fmean(p[x] for p in points))
        mean, std = mean_std([p["val_loss"] for p in points])
        means.append(mean)
        stds.append(std or 0.0)
    return xs, means, stds


def plot_curves(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """The speedrunner's plot: val loss vs tokens and vs training wall time, mean ± std band per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    groups = group_runs([r for r in rows if r["status"] == "ok"])
    # a speedrun sweep has 12-24 configurations: beyond matplotlib's 10 colours, the line style tells them apart
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    for i, (label, runs) in enumerate(groups.items()):
        curves = [val_curve(Path(r["run_dir"]), r.get("tokens_per_step")) for r in runs]
        style = {"color": colors[i % len(colors)], "linestyle": ("-", "--", ":")[i // len(colors) % 3]}
        for ax, x in zip(axes, ("tokens", "train_time_s"), strict=True):
            xs, means, stds = mean_curve(curves, x)
            if not xs:
                continue
            (line,) = ax.plot(xs, means, marker="." if len(xs) < 30 else None, label=f"{label} (n={len(runs)})",
                              **style)  # fmt: skip
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for target in sorted({r["target_val_loss"] for r in rows if r.get("target_val_loss") is not None}):
        for ax in axes:
            ax.axhline(target, color="black", linestyle="--", linewidth=1)
            ax.annotate(f"target {target:g}", (0, target), xycoords=("axes fraction", "data"), xytext=(4, 3),
                        textcoords="offset points", fontsize=8)  # fmt: skip
    axes[0].set_xlabel("tokens trained")
    axes[1].set_xlabel("training wall time (s; evals, samples, checkpoints excluded)")
    axes[0].set_ylabel("val loss (mean over seeds, ± std band)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if any(ax.has_data() for ax in axes):
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no val-loss evaluations", ha="center", transform=axes[0].transAxes)
    fig.suptitle(f"{title}: val loss against tokens and training time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
