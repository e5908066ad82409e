"""Run logging: a console line and `metrics.jsonl` always, W&B when `logger=wandb`.

The train loop sees one object:

    logger = build_logger(cfg, run_dir, is_main)
    logger.log(step, {"loss": 5.1, "lr": 6e-4, ...})   # python floats, no tensors (no host syncs here)
    logger.log_samples(step, ["text", ...])
    logger.log_files([run_dir / "sweep.png"])
    logger.finish({"val_loss": 3.3, ...})               # writes run_dir/summary.json, closes W&B

Local files are the record and never depend on W&B. W&B is a best-effort mirror: it must never make
training fail or hang, so init is bounded by `logger.init_timeout`, an online run that cannot start is
retried offline, and any W&B error after that warns once and turns W&B off for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2x.run.record import REPO_DIR, git_info, hydra_run_info, job_type, jsonable, run_group, run_name, write_json

log = logging.getLogger("gpt2x")

# Train-loop metric name -> W&B key. The prefix makes W&B put each family in its own panel section.
WANDB_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "ms_per_batch": "perf/ms_per_batch",
    "tokens_per_sec": "perf/tokens_per_sec",
    "mfu": "perf/mfu",
    "peak_mem_bytes": "perf/peak_mem",
    "val_loss": "val/loss",
    "hellaswag": "eval/hellaswag",
    "eval_s": "perf/eval_s",
    # on eval rows: where the run stands, the x axes of the speedrunner's plot (val/loss against either)
    "tokens": "val/tokens",
    "train_time_s": "val/train_time_s",
    # once, on the eval row that first reaches target_val_loss (gpt2x/target.py)
    "step_to_target": "target/step_to_target",
    "tokens_to_target": "target/tokens_to_target",
    "time_to_target_s": "target/time_to_target_s",
}



def wandb_key(name: str) -> str:
    """The W&B key a train-loop metric is logged under (unknown names pass through unchanged)."""
    return WANDB_KEYS.get(name, name)


class NullLogger:
    """The logger of non-main ranks: every method does nothing, so the loop needs no `if is_main`."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Do nothing."""

    def log_samples(self, step: int, samples: list[str]) -> None:
        """Do nothing."""

    def log_files(self, paths: Iterable[str | Path]) -> None:
        """Do nothing."""

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Do nothing."""


class RunLogger:
    """Main-rank logger: console + `metrics.jsonl` + `samples.jsonl` + `summary.json`, and an optional W&B run."""

    def __init__(self, run_dir: Path, wandb_run: Any = None, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A run resumed at start_step continues the history of the run that was killed: the lines that run logged
        # after its last checkpoint are about to be logged again, so they go.
        for name in ("metrics.jsonl", "samples.jsonl"):
            drop_rows_from(self.run_dir / name, start_step)
        self.wandb_run = wandb_run
        self._samples_table = None
        self._finished = False
        # Line-buffered appends: every line is on disk as soon as it is logged, so a crashed run keeps its history.
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")
        self._samples_file = None

    # -- the four calls the train loop makes ---------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's metrics: a console line, a `metrics.jsonl` line, and a W&B history row."""
        self._metrics_file.write(json.dumps({"step": step, **jsonable(metrics)}) + "\n")
        log.info(format_metrics(step, metrics))
        if self.wandb_run is not None:
            row = {wandb_key(k): v for k, v in metrics.items()}
            row["step"] = step
            self._wandb("log", lambda: self.wandb_run.log(row))

    def log_samples(self, step: int, samples: list[str]) -> None:
        """Log generated text: console, `samples.jsonl` (one line per sample) and a W&B table (step, sample)."""
        if self._samples_file is None:
            self._samples_file = open(self.run_dir / "samples.jsonl", "a", buffering=1, encoding="utf-8")
        for i, text in enumerate(samples):
            self._samples_file.write(json.dumps({"step": step, "sample": text}) + "\n")
            log.info("step %5d | sample %d | %s", step, i, text)
        if self.wandb_run is not None:
            self._wandb("log_samples", lambda: self._log_samples_wandb(step, samples))

    def log_files(self, paths: Iterable[str | Path]) -> None:
        """Attach finished files (plots, reports) to the W&B run: images as `wandb.Image`, all as one artifact."""
        paths = [Path(p) for p in paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            log.warning("log_files: skipping missing files %s", missing)
        paths = [p for p in paths if p.is_file()]
        if self._finished:
            log.warning("log_files after finish: %s not attached to W&B; call log_files before finish", paths)
        elif paths and self.wandb_run is not None:
            self._wandb("log_files", lambda: self._log_files_wandb(paths))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Write `run_dir/summary.json`, copy it to the W&B run summary and close everything (idempotent)."""
        if self._finished:
            return
        self._finished = True
        summary = jsonable(summary or {})
        write_json(self.run_dir / "summary.json", summary)
        if self.wandb_run is not None:
            self._wandb("summary", lambda: self.wandb_run.summary.update(summary))
        if self.wandb_run is not None:
            self._wandb("finish", lambda: self.wandb_run.finish())
        self.wandb_run = None
        self._metrics_file.close()
        if self._samples_file is not None:
            self._samples_file.close()

    # -- W&B helpers ---------------------------------------------------------------------------------------

    def _wandb(self, what: str, fn) -> None:
        """Run one W&B call; on any error warn once and turn W&B off so training carries on."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B %s failed (%s: %s); continuing with local logging only", what, type(e).__name__, e)
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def _log_samples_wandb(self, step: int, samples: list[str]) -> None:
        import wandb

        # One table for the whole run: INCREMENTAL uploads only the new rows on each log.
        if self._samples_table is None:
            self._samples_table = wandb.Table(columns=["step", "sample"], log_mode="INCREMENTAL")
        for text in samples:
            self._samples_table.add_data(step, text)
        self.wandb_run.log({"samples": self._samples_table, "step": step})

    def _log_files_wandb(self, paths: list[Path]) -> None:
        import wandb

        images = {
            f"files/{p.stem}": wandb.Image(str(p)) for p in paths if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        }
        if images:
            self.wandb_run.log(images)
        artifact = wandb.Artifact(f"files-{self.wandb_run.id}", type="run-files")
        for p in paths:
            artifact.add_file(str(p), name=p.name)
        self.wandb_run.log_artifact(artifact)


# metric -> its piece of the console line, in this order
CONSOLE_FIELDS = {
    "loss": lambda v: f"loss {v:.4f}",
    "lr": lambda v: f"lr {v:.2e}",
    "grad_norm": lambda v: f"norm {v:.2f}",
    "ms_per_batch": lambda v: f"{v:.1f} ms",
    "tokens_per_sec": lambda v: f"{v:,.0f} tok/s",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
    "peak_mem_bytes": lambda v: f"mem {v / 2**30:.2f} GiB",
    "val_loss": lambda v: f"val {v:.4f}",
    "hellaswag": lambda v: f"hella {v:.4f}",
    "train_time_s": lambda v: f"trained {v:.1f} s",
}


def format_metrics(step: int, m: dict[str, Any]) -> str:
    """The compact console line: `step    10 | loss 5.1234 | lr 6.00e-04 | norm 1.23 | 123.4 ms | ...`.

    Only the metrics present are shown, so eval-only calls print just their figures.
    `mfu` is a fraction (0.123 prints as 12.3%).
    """
    parts = [f"step {step:5d}"] + [fmt(m[key]) for key, fmt in CONSOLE_FIELDS.items() if key in m]
    return " | ".join(parts)


def drop_rows_from(path: Path, start_step: int) -> None:
    """Rewrite a jsonl history without its rows of step >= start_step (atomically; nothing to do if none)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # a line cut short by a kill mid-write is dropped too
    kept = [ln for ln in lines if ln.endswith("\n") and json.loads(ln).get("step", -1) < start_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def build_logger(
    cfg: DictConfig, run_dir: str | Path, is_main: bool, start_step: int = 0
) -> RunLogger | NullLogger:
    """Make the run's logger from the composed config: NullLogger off the main rank, else RunLogger.

    With `logger.name=wandb` a W&B run is started inside `run_dir` (name = task overrides, group = the
    multirun sweep, job_type = experiment); if it cannot start, the run goes on with local logging only.
    """
    if not is_main:
        return NullLogger()
    run_dir = Path(run_dir)
    _ensure_console()
    lcfg = cfg.get("logger") if isinstance(cfg, DictConfig) else None
    name = lcfg.get("name", "none") if lcfg is not None else "none"
    if name not in ("none", "wandb"):
        raise ValueError(f"logger.name={name!r} is not a known logger; set logger.name to 'none' or 'wandb'")
    run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = _start_wandb(cfg, run_dir) if name == "wandb" else None
    return RunLogger(run_dir, wandb_run, start_step)


def _ensure_console() -> None:
    """Make `gpt2x` INFO lines visible: Hydra configures logging, a bare script or test may not have."""
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


# -- W&B run setup ---------------------------------------------------------------------------------------


def wandb_has_credentials() -> bool:
    """Whether an API key for the W&B host is configured (WANDB_API_KEY or a netrc entry); no network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return wbnetrc.read_netrc_auth(host=host) is not None
    except Exception:  # noqa: BLE001 - private wandb API; a changed layout just means "not configured"
        return False


def resolve_mode(mode: str) -> str:
    """`logger.mode` -> the W&B mode to start in: auto = online with credentials (or WANDB_MODE), else offline."""
    valid = ("auto", "online", "offline", "disabled")
    if mode not in valid:
        raise ValueError(f"logger.mode={mode!r} is not valid; set logger.mode to one of {', '.join(valid)}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


def _start_wandb(cfg: DictConfig, run_dir: Path, **identity: Any) -> Any:
    """Start the W&B run, or return None (with one warning) when it cannot start.

    `identity` (name, group, job_type) replaces what the Hydra job would give, e.g. for a sweep's report run.
    """
    lcfg = cfg.logger
    mode = resolve_mode(lcfg.get("mode", "auto"))
    if mode == "disabled":
        return None
    if mode == "online" and not wandb_has_credentials():
        # wandb would otherwise prompt for a key, which hangs a non-interactive job.
        log.warning("W&B online mode needs WANDB_API_KEY or `wandb login`; logging W&B offline instead")
        mode = "offline"
    try:
        import wandb
    except ImportError as e:
        log.warning("W&B could not start (%s); continuing with local logging only", e)
        return None

    info = hydra_run_info()
    tags = lcfg.get("tags")
    init_kwargs = dict(
        project=lcfg.get("project") or "gpt2x",
        entity=lcfg.get("entity") or None,
        name=run_name(info.get("overrides", [])),
        group=OmegaConf.select(cfg, "logger.group", default=None) or run_group(info),
        job_type=job_type(cfg),
        tags=list(tags) if tags else None,
        notes=lcfg.get("notes") or None,
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(run_dir),
        reinit="finish_previous",  # a multirun's jobs share one process
    )
    init_kwargs.update(identity)
    timeout = float(lcfg.get("init_timeout") or 30)
    settings: dict[str, Any] = {"init_timeout": timeout}
    if git_info()["commit"] is not None:
        settings["git_root"] = str(REPO_DIR)  # the code's repo, which a run dir outside it would not find
    attempts = [mode, "offline"] if mode == "online" else [mode]
    errors = []
    wandb_dir = run_dir / "wandb"
    for attempt in attempts:
        before = set(wandb_dir.glob("*run-*")) if wandb_dir.is_dir() else set()
        try:
            run = wandb.init(mode=attempt, settings=wandb.Settings(**settings), **init_kwargs)
            run.define_metric("step")
            run.define_metric("*", step_metric="step")  # x axis = optimizer step, even across resumes
            if errors:
                log.warning("W&B online start failed (%s); logging W&B offline instead", errors[-1])
            return run
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            try:
                wandb.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
            # The failed attempt leaves an empty run dir behind; drop it so sweep readers see real runs only.
            for stale in set(wandb_dir.glob("*run-*")) - before if wandb_dir.is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)
    log.warning("W&B could not start (%s); continuing with local logging only", "; ".join(errors))
    return None
