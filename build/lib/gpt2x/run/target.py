"""Time to target, the speedrun's metric: the steps, tokens and seconds of training a run needs to reach a val loss.

With `target_val_loss` set, the first evaluation at or below it records

- `step_to_target`: optimizer steps done before that evaluation (the `step` of its row in metrics.jsonl: the loop
  evaluates at the top of a step, before training it);
- `tokens_to_target` = step_to_target x tokens per optimizer step (all ranks);
- `time_to_target_s`: the training wall time of those steps, the sum of each step's time as the loop measures it
  (device-synced; data loading, forward, backward, optimizer, and the compilation the first steps trigger included).
  Evaluation, sampling, HellaSwag, checkpoints and logging between steps are left out, and so is the set-up before
  the first step, as in the GPT-2 speedrun.

A run that never gets there records nulls for the three, plus its best val loss and the step of it.
`stop_at_target=true` ends the run at that evaluation. The evaluations all read the same val tokens: `evaluate` resets
the val loader to its first batch each time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

TARGET_FIGURES = ("step_to_target", "tokens_to_target", "time_to_target_s")

# What `gpt2x-train` returns to a sweeper (hydra-optuna-sweeper minimizes it). A run that misses the target scores
# +inf on the to-target objectives, so any run that reaches it ranks better.
OBJECTIVES = ("auto", "final_val_loss", "best_val_loss", *TARGET_FIGURES)


def check_target_settings(cfg) -> None:
    """Fail before training on target/objective settings that cannot work, naming the setting and the fix."""
    target = cfg.target_val_loss
    if target is not None and not target > 0:
        raise ValueError(f"target_val_loss={target} must be a positive loss (e.g. 3.28), or null to turn it off")
    if target is not None and cfg.eval_interval <= 0:
        raise ValueError(
            f"target_val_loss={target} needs periodic evaluations to find when it is reached, but eval_interval="
            f"{cfg.eval_interval} evaluates only at the end; set eval_interval to a positive number of steps, e.g. 50"
        )
    if cfg.stop_at_target and target is None:
        raise ValueError("stop_at_target=true needs a target: set target_val_loss (e.g. target_val_loss=3.28)")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} is not an objective; valid: {', '.join(OBJECTIVES)}")
    if cfg.objective in TARGET_FIGURES and target is None:
        raise ValueError(f"objective={cfg.objective} needs target_val_loss; set it, or use objective=final_val_loss")


def resolve_objective(objective: str, target: float | None) -> str:
    """`auto` is time to target when a target is set, else the final val loss."""
    if objective == "auto":
        return "time_to_target_s" if target is not None else "final_val_loss"
    return objective


def objective_value(cfg, summary: dict[str, Any]) -> float:
    """The number a sweeper minimizes for this run: the summary's `objective` figure, +inf if it has none."""
    value = summary.get(resolve_objective(cfg.objective, cfg.target_val_loss))
    return float("inf") if value is None else float(value)


class TargetTracker:
    """Training wall time so far, eval time, the best val loss, and the first evaluation at or below the target.

    The loop calls `add_train_time` after each step and `evaluated` after each evaluation; `summary` gives the
    figures for summary.json. `state_dict` goes into checkpoints, so a resumed run keeps counting from there.
    """

    def __init__(self, target: float | None, tokens_per_step: int, stop_at_target: bool = False, state=None):
        self.target, self.tokens_per_step, self.stop_at_target = target, tokens_per_step, stop_at_target
        self.train_time_s = 0.0  # steps only: what time_to_target_s counts
        self.eval_time_s = 0.0
        self.wall_before_s = 0.0  # wall time of the run before the checkpoint this one resumed from
        self.best_val_loss: float | None = None
        self.best_val_step: int | None = None
        self.reached: dict[str, Any] | None = None  # the TARGET_FIGURES, once reached
        if state:
            self.load_state_dict(state)
        self._start = time.perf_counter()

    def add_train_time(self, seconds: float) -> None:
        """Count one optimizer step's wall time."""
        self.train_time_s += seconds

    def evaluated(self, step: int, val_loss: float, eval_s: float) -> dict[str, Any]:
        """Record the evaluation at the top of `step`; return the figures for its metrics.jsonl row."""
        self.eval_time_s += eval_s
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, step
        row = {"tokens": step * self.tokens_per_step, "train_time_s": self.train_time_s, "eval_s": eval_s}
        if self.target is not None and self.reached is None and val_loss <= self.target:
            self.reached = dict(zip(TARGET_FIGURES, (step, row["tokens"], self.train_time_s), strict=True))
            row |= self.reached
            log.info(
                "reached target_val_loss=%g at step %d: val %.4f after %s tokens and %.1f s of training",
                self.target, step, val_loss, f"{row['tokens']:,}", self.train_time_s,
            )  # fmt: skip
        return row

    @property
    def should_stop(self) -> bool:
        """stop_at_target is on and the target has been reached."""
        return self.stop_at_target and self.reached is not None

    def summary(self) -> dict[str, Any]:
        """The run's time figures, best val loss, and (with a target) the to-target figures, null when not reached."""
        out = {
            "train_time_s": self.train_time_s,
            "eval_time_s": self.eval_time_s,
            "wall_time_s": self.wall_before_s + time.perf_counter() - self._start,
            "best_val_loss": self.best_val_loss,
            "best_val_step": self.best_val_step,
        }
        if self.target is not None:
            out |= {"target_val_loss": self.target, "reached_target": self.reached is not None}
            out |= self.reached or dict.fromkeys(TARGET_FIGURES)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers for a weights_only checkpoint."""
        return {
            "train_time_s": self.train_time_s,
            "eval_time_s": self.eval_time_s,
            "wall_time_s": self.wall_before_s + time.perf_counter() - self._start,
            "best_val_loss": self.best_val_loss,
            "best_val_step": self.best_val_step,
            "reached": self.reached,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
        self.train_time_s, self.eval_time_s = state["train_time_s"], state["eval_time_s"]
        self.wall_before_s = state["wall_time_s"]
        self.best_val_loss, self.best_val_step = state["best_val_loss"], state["best_val_step"]
        self.reached = state["reached"]
