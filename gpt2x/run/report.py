"""Sweep reports: after a Hydra multirun, one table of speed figures per run, as CSV, Markdown and a bar chart.

`SweepReport` is a Hydra callback (registered in conf/config.yaml under hydra.callbacks): after every job of a multirun
it rewrites `sweep.csv`, `sweep.md` and `sweep.png` in the sweep dir, so a sweep that stops at a failed run still
leaves a report marking it, and at the end it prints the table. `gpt2x-report DIR` rebuilds the same files from any
finished multirun dir, reading each job's `summary.json` (written by the training loop) and `.hydra/overrides.yaml`.

A run is named by its ladder rung when it has one (`rung=bf16`), else by the overrides that differ between the runs of
the sweep (`precision=bf16 attention=flash`); overrides shared by every run are listed once above the table. Runs
whose names differ only in `seed=` are one configuration: gpt2x/seeds.py adds the per-configuration table
(`sweep_seeds.csv`, and in `sweep.md` when there are seeds or a target) and the loss curves (`sweep_curves.png`).
Runs under `profile=trace` add a table of where the step time goes to `sweep.md` and `sweep_profile.png`
(gpt2x/run/profile.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt2x.run import profile, seeds
from gpt2x.run.logger import RunLogger, _start_wandb
from gpt2x.run.record import read_run_summary, run_group

log = logging.getLogger(__name__)

# sweep_seeds.csv: one row per configuration over its seeds; sweep_curves.png: val loss vs tokens and time (seeds.py)
REPORT_FILES = ("sweep.csv", "sweep.md", "sweep.png", "sweep_seeds.csv", "sweep_curves.png")

# CSV columns, in order: (key, meaning). Speed figures are the medians over the timed (post-warm-up) steps.
CSV_COLUMNS = {
    "job": "Hydra job number (empty for a single run)",
    "run": "rung name, or the overrides that set this run apart",
    "config": "the run's label without its seed: runs that differ only in seed share it",
    "seed": "the run's seed",
    "status": "ok, or failed (see error)",
    "ms_per_batch": "median wall time of one optimizer step (all micro-steps, device synced)",
    "ms_per_batch_p10": "10th percentile of the step time",
    "ms_per_batch_p90": "90th percentile of the step time",
    "tokens_per_sec": "tokens per optimizer step / median step time",
    "mfu": "model FLOPs utilization, a fraction of peak_flops",
    "speedup": "ms_per_batch of the first run / this run's",
    "final_loss": "train loss of the last step",
    "final_val_loss": "val loss at the last step",
    "peak_mem_bytes": "peak memory of the (rank 0) process",
    "warmup_s": "time of the untimed warm-up steps (includes compilation)",
    "target_val_loss": "the val loss time to target is measured to (empty: none set)",
    "step_to_target": "optimizer steps before the first eval at or below the target (empty: not reached)",
    "tokens_to_target": "tokens trained before that eval",
    "time_to_target_s": "training wall time before that eval (steps only: evals, samples, checkpoints excluded)",
    "best_val_loss": "lowest val loss of the run",
    "best_val_step": "step of the lowest val loss",
    "train_time_s": "training wall time of all steps",
    "timed_steps": "steps in the timing summary",
    "tokens_per_step": "tokens per optimizer step, all ranks",
    "world_size": "processes",
    "peak_flops": "FLOP/s the MFU is measured against",
    "peak_flops_source": "where peak_flops came from",
    "device_name": "device",
    "overrides": "this job's command-line overrides",
    "run_dir": "the job's run directory",
    "error": "first line of the failure, for failed runs",
}


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job dirs of a multirun: every dir below `sweep_dir` holding `.hydra/overrides.yaml`, in job-number order."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda d: (_job_num(d) is None, _job_num(d) or 0, str(d)))


def _job_num(job_dir: Path) -> int | None:
    """The Hydra job number of a multirun job; None for a single run (`hydra.job.num` is unset there)."""
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    try:
        return int(OmegaConf.load(hydra_yaml).hydra.job.num)
    except Exception:  # noqa: BLE001 - an unreadable hydra.yaml falls back to the dir name
        return int(job_dir.name) if job_dir.name.isdigit() else None


def read_job(job_dir: Path) -> dict[str, Any]:
    """One job's overrides, summary (None if it has none: failed or still running) and error text."""
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    summary = read_run_summary(job_dir)
    error_path = job_dir / "error.txt"
    error = error_path.read_text().strip().splitlines()[0] if error_path.exists() else None
    config_path = job_dir / ".hydra" / "config.yaml"
    seed = OmegaConf.select(OmegaConf.load(config_path), "seed", default=None) if config_path.exists() else None
    return {
        "job": _job_num(job_dir), "dir": job_dir, "overrides": overrides, "summary": summary, "error": error,
        "seed": seed,
    }  # fmt: skip


def common_overrides(jobs: list[dict]) -> list[str]:
    """Overrides every job of the sweep shares (in the first job's order)."""
    if not jobs:
        return []
    shared = set(jobs[0]["overrides"]).intersection(*(set(j["overrides"]) for j in jobs[1:]))
    return [o for o in jobs[0]["overrides"] if o in shared]


def build_rows(sweep_dir: Path, baseline: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the report (one per job, CSV_COLUMNS keys) and facts shared by the sweep (title, device, common).

    Speed-ups are against the first run of configuration `baseline` (a `config` label; None = the first run).
    """
    jobs = [read_job(d) for d in find_jobs(sweep_dir)]
    common = common_overrides(jobs) if len(jobs) > 1 else []
    rows = []
    for j in jobs:
        s = j["summary"] or {}
        own = [o for o in j["overrides"] if o not in common]
        if j["job"] is None:  # a single run (gpt2x-report RUN_DIR): its own dir names it; overrides have a column
            config = label = s.get("rung") or j["dir"].name
        else:
            config, seed = config_label(s.get("rung") or _rung_override(j["overrides"]), own)
            label = " ".join(filter(None, (config, seed))) or f"run {j['job']}"
        ok = "ms_per_batch" in s
        row = {k: s.get(k) for k in CSV_COLUMNS}
        row |= {
            "job": j["job"],
            "run": label,
            "config": config or "all",
            "seed": j["seed"],
            "status": "ok" if ok else ("failed" if j["error"] or j["summary"] is None else "no timed steps"),
            "overrides": " ".join(j["overrides"]),
            "run_dir": str(j["dir"]),
            "error": j["error"],
            "speedup": None,
            # profile=trace: ms per step by category (the split table and sweep_profile.png; not CSV columns)
            "profile_ms": s.get("profile_ms"),
            "profile_step_ms": s.get("profile_step_ms"),
        }
        rows.append(row)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if baseline is not None and baseline not in configs:
        valid = ", ".join(repr(c) for c in configs)
        raise ValueError(f"report_baseline={baseline!r} is not a configuration of this sweep; valid: {valid}")
    base = next((r for r in rows if r["status"] == "ok" and baseline in (None, r["config"])), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["speedup"] = base["ms_per_batch"] / r["ms_per_batch"]
    summaries = [j["summary"] for j in jobs if j["summary"]]
    first = summaries[0] if summaries else {}
    meta = {
        "title": first.get("experiment") or "sweep",
        "sweep_dir": str(sweep_dir),
        "baseline": base["run"] if base else None,
        "baseline_setting": baseline,
        "has_target": any(r["target_val_loss"] is not None for r in rows),
        "common": common,
        "devices": sorted({s.get("device_name") or "?" for s in summaries}),
        "torch": first.get("torch_version"),
        "git_commit": first.get("git_commit"),
        "config": first.get("config"),
        "tokens_per_step": sorted({s.get("tokens_per_step") for s in summaries if s.get("tokens_per_step")}),
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return rows, meta


def config_label(rung: str | None, own: list[str]) -> tuple[str, str]:
    """(configuration, seed) labels of a run: the rung and its own overrides but `seed=`, and the `seed=` override.

    `recipe=X` is left out of the label too: every recipe names its rung X (conf/recipe/), so the rung already says it.
    """
    keys = [o.split("=", 1)[0].lstrip("+~") for o in own]
    seed = " ".join(o for o, k in zip(own, keys, strict=True) if k == "seed")
    rest = [o for o, k in zip(own, keys, strict=True) if k not in ("seed", "rung") and not (rung and k == "recipe")]
    return " ".join(([rung] if rung else []) + rest), seed


def _rung_override(overrides: list[str]) -> str | None:
    for o in overrides:
        if o.lstrip("+").startswith("rung="):
            return o.split("=", 1)[1]
    return None


FORMATS = {
    "ms": lambda v: f"{v:,.1f}" if v < 1000 else f"{v:,.0f}",
    "int": lambda v: f"{v:,.0f}",
    "pct": lambda v: f"{100 * v:.1f}%",
    "x": lambda v: f"{v:.2f}x",
    "loss": lambda v: f"{v:.4f}",
    "gib": lambda v: f"{v / 2**30:.2f} GiB",
    "s": lambda v: f"{v:.1f} s",
}


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return FORMATS.get(kind, str)(value)


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report as Markdown: a few lines of context, then one table row per run."""
    lines = [f"# {meta['title']}: {len(rows)} runs", ""]
    lines.append(f"- sweep dir: `{meta['sweep_dir']}`, written {meta['written']}")
    lines.append(f"- device: {', '.join(meta['devices']) or '?'}; torch {meta['torch']}; git {meta['git_commit']}")
    if meta["common"]:
        lines.append(f"- every run: `{' '.join(meta['common'])}`")
    if meta["tokens_per_step"]:
        lines.append(f"- tokens per optimizer step: {', '.join(f'{t:,}' for t in meta['tokens_per_step'])}")
    against = f"report_baseline={meta['baseline_setting']}" if meta["baseline_setting"] else "the first run"
    lines.append(
        "- ms/batch: median wall time of one optimizer step incl. all micro-steps, device-synced, warm-up steps "
        f"(and compilation) excluded; p10-p90 in brackets. Speed-up vs {against}"
        + (f" ({meta['baseline']})." if meta["baseline"] else ".")
    )
    target_cols = meta["has_target"]
    if target_cols:
        lines.append(
            "- to target: tokens and training seconds (steps only: evals, samples, checkpoints excluded; compilation "
            "included) before the first eval at or below target_val_loss; `-` = not reached (best val loss shown)"
        )
    header = "| # | run | ms/batch (p10-p90) | tokens/s | MFU | speed-up | loss | val loss | peak mem | warm-up |"
    lines += ["", header + (" tokens to target | time to target |" if target_cols else "")]
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if target_cols else ""))
    for r in rows:
        if r["status"] == "ok":
            spread = f"{_fmt(r['ms_per_batch_p10'], 'ms')}-{_fmt(r['ms_per_batch_p90'], 'ms')}"
            ms = f"{_fmt(r['ms_per_batch'], 'ms')} ({spread})"
        else:
            ms = f"**{r['status']}**" + (f": {r['error'][:80]}" if r["error"] else "")
        cells = [
            "-" if r["job"] is None else str(r["job"]),
            r["run"],
            ms,
            _fmt(r["tokens_per_sec"], "int"),
            _fmt(r["mfu"], "pct"),
            _fmt(r["speedup"], "x"),
            _fmt(r["final_loss"], "loss"),
            _fmt(r["final_val_loss"], "loss"),
            _fmt(r["peak_mem_bytes"], "gib"),
            _fmt(r["warmup_s"], "s"),
        ]
        if target_cols:
            missed = f"- (best {_fmt(r['best_val_loss'], 'loss')})" if r["status"] == "ok" else "-"
            reached = r["tokens_to_target"] is not None
            cells += [_fmt(r["tokens_to_target"], "int") if reached else missed, _fmt(r["time_to_target_s"], "s")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if groups := meta.get("groups"):
        if meta["has_target"] or any(g["n"] > 1 for g in groups):
            lines += ["", seeds.render_groups_markdown(groups, _fmt)]
    if any(r.get("profile_ms") for r in rows):
        lines += ["", profile.sweep_markdown(rows)]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path, columns=CSV_COLUMNS) -> None:
    """All `columns`, one row per run (or per configuration), raw numbers (fractions, bytes, ms)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")  # rows also hold profile_ms
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Bar chart of ms/batch per run (p10-p90 whiskers) with the speed-up over each bar; log scale for wide spreads."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in worker processes
    import matplotlib.pyplot as plt

    labels = [r["run"] for r in rows]
    ok = [r["status"] == "ok" for r in rows]
    ms = [r["ms_per_batch"] if good else 0.0 for r, good in zip(rows, ok, strict=True)]
    lo = [r["ms_per_batch"] - r["ms_per_batch_p10"] if good else 0 for r, good in zip(rows, ok, strict=True)]
    hi = [r["ms_per_batch_p90"] - r["ms_per_batch"] if good else 0 for r, good in zip(rows, ok, strict=True)]
    values = [m for m, good in zip(ms, ok, strict=True) if good]
    log_scale = bool(values) and max(values) / min(values) > 10

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    x = range(len(rows))
    colors = ["tab:blue" if good else "lightgray" for good in ok]
    ax.bar(x, ms, color=colors, yerr=[lo, hi], capsize=3, ecolor="dimgray")
    if log_scale:
        ax.set_yscale("log")
    top = max((m + h for m, h, good in zip(ms, hi, ok, strict=True) if good), default=1.0)  # highest whisker
    for i, r in enumerate(rows):
        if r["status"] == "ok":
            text = f"{r['speedup']:.2f}x\n{r['ms_per_batch']:,.0f} ms"
            ax.annotate(text, (i, r["ms_per_batch"] + hi[i]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        else:
            ax.annotate(r["status"], (i, min(values) if values else 1.0), ha="center", va="bottom", fontsize=8,
                        color="firebrick", rotation=90)  # fmt: skip
    ax.set_ylim(top=top * (4 if log_scale else 1.3))  # room for the annotations above the highest whisker
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0, ha="right", fontsize=9)
    ax.set_ylabel("ms per optimizer step (median, p10-p90)" + (", log scale" if log_scale else ""))
    subtitle = ", ".join(meta["devices"])
    if meta["common"]:
        subtitle += "\n" + " ".join(meta["common"])[:150]
    ax.set_title(f"{meta['title']}: ms/batch and speed-up vs {meta['baseline']}\n{subtitle}", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path, echo: bool = False, baseline: str | None = None) -> dict[str, Path]:
    """Write the REPORT_FILES into `sweep_dir` from its job dirs; print the table when `echo`.

    `baseline`: the configuration speed-ups and p-values are against (the `report_baseline` setting; None = first).
    """
    sweep_dir = Path(sweep_dir)
    rows, meta = build_rows(sweep_dir, baseline)
    if not rows:
        raise FileNotFoundError(
            f"{sweep_dir} holds no Hydra job dirs (*/.hydra/overrides.yaml); give the dir of a multirun "
            f"(hydra.sweep.dir, e.g. outputs/multirun/<date>/<time>)"
        )
    paths = {name: sweep_dir / name for name in REPORT_FILES}
    meta["groups"] = seeds.compare_groups(rows, baseline)
    write_csv(rows, paths["sweep.csv"])
    write_csv(meta["groups"], paths["sweep_seeds.csv"], seeds.GROUP_CSV_COLUMNS)
    markdown = render_markdown(rows, meta)
    paths["sweep.md"].write_text(markdown, encoding="utf-8")
    plot(rows, meta, paths["sweep.png"])
    seeds.plot_curves(rows, meta["title"], paths["sweep_curves.png"])
    if any(r.get("profile_ms") for r in rows):  # profile=trace: the split by category, per run
        paths["sweep_profile.png"] = sweep_dir / "sweep_profile.png"
        profile.plot_sweep(rows, meta["title"], paths["sweep_profile.png"])
    if echo:
        print(markdown, flush=True)
        print(f"report: {', '.join(str(p) for p in paths.values())}", flush=True)
    return paths


def write_report_with_baseline(sweep_dir: Path, config: DictConfig, echo: bool = False) -> dict[str, Path]:
    """`write_report` against the config's `report_baseline`; one that names no configuration of the sweep is
    reported and the first configuration used instead, so the sweep still gets its report."""
    baseline = OmegaConf.select(config, "report_baseline", default=None)
    try:
        return write_report(sweep_dir, echo=echo, baseline=baseline)
    except ValueError as e:
        if baseline is None:
            raise
        log.warning("%s; comparing against the first configuration instead", e)
        return write_report(sweep_dir, echo=echo)


class SweepReport(Callback):
    """Hydra callback: rewrite the sweep report after each job of a multirun and print it at the end."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        hydra_cfg = config.get("hydra")
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return
        # the job's resolved config fixes the sweep dir (its ${now:...} may resolve differently later)
        self.sweep_dir = Path(str(hydra_cfg.sweep.dir)).absolute()
        if job_return is not None and getattr(job_return.status, "name", "") == "FAILED":
            error = job_return._return_value  # the exception (reading .return_value would re-raise it)
            out = Path(str(hydra_cfg.runtime.output_dir))
            (out / "error.txt").write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
        try:
            write_report_with_baseline(self.sweep_dir, config)
        except Exception as e:  # noqa: BLE001 - a report problem must never fail the sweep itself
            log.warning("sweep report not written: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir)).absolute()
        try:
            paths = write_report_with_baseline(sweep_dir, config, echo=True)
            log_sweep_report(config, sweep_dir, paths.values())
        except Exception as e:  # noqa: BLE001
            log.warning("sweep report not written: %s", e)


def main(argv: list[str] | None = None) -> int:
    """`gpt2x-report DIR`: rebuild sweep.csv, sweep.md and sweep.png of a finished multirun and print the table."""
    parser = argparse.ArgumentParser(prog="gpt2x-report", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (hydra.sweep.dir)")
    parser.add_argument("-q", "--quiet", action="store_true", help="write the files without printing the table")
    parser.add_argument("--baseline", help="the configuration to compare against (its label in the report)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory; give the dir of a multirun (hydra.sweep.dir)")
    try:
        write_report(args.sweep_dir, echo=not args.quiet, baseline=args.baseline)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def log_sweep_report(cfg: DictConfig, sweep_dir: Path, paths: Iterable[Path]) -> None:
    """With logger=wandb, log a sweep's report files (table, plot) to a W&B run in the sweep's own group."""
    if OmegaConf.select(cfg, "logger.name", default="none") != "wandb":
        return
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra's own keys resolve only in a job
    group = run_group({"multirun": True, "sweep_dir": str(sweep_dir), "cwd": os.getcwd()})
    report_dir = Path(sweep_dir) / "report"
    run = _start_wandb(cfg, report_dir, name=f"report {Path(sweep_dir).name}", group=group, job_type="sweep-report")
    if run is not None:
        logger = RunLogger(report_dir, run)
        logger.log_files(list(paths))
        logger.finish({"sweep_dir": str(sweep_dir)})
