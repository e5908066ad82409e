"""Where the time of a training step goes: torch.profiler over a few steps, a Chrome trace and a per-category split.

`profile=trace` records `profile.steps` optimizer steps from `profile.start_step` (default: the first timed step, so
compilation and allocator warm-up are behind) on rank 0 and writes into the run dir:

- `trace.json.gz`: the Chrome trace; open it in https://ui.perfetto.dev or chrome://tracing;
- `profile.md`: the step time split into categories (matmul, attention, softmax/CE, ...) and the top operators;
- `profile_ms` (category -> ms per step), `profile_step_ms` and `profile_timer_ms` in summary.json, from which the
  sweep report builds its per-run split table and `sweep_profile.png`;
- with `profile.memory=true` on CUDA, `memory_snapshot.pickle`: drag it into https://pytorch.org/memory_viz.

The loop sees one object; under `profile=none` it is a `NullProfiler`, whose calls create nothing and do nothing:

    profiler = build_profiler(cfg, run_dir, dist.is_main, device, start_step)
    profiler.begin_step()                  # before timer.start(): advances the profiler's schedule
    with profiler.region("data"): ...      # labels around data, forward, backward, optimizer
    profiler.end_step(ms)                  # after timer.stop(), with the step's ms_per_batch
    results |= profiler.finish(results)    # after the loop: profile.md, the summary figures

How the split is counted: each op inside a recorded step (the loop's `train/step` range) contributes its *self* time,
its own time without the ops it called, so nothing counts twice and the categories add up to the step. On CPU that
is host time: the ops run on the calling thread (backward too), and their self times add up to the step's wall time
exactly. On CUDA it is GPU time: each op's self kernel time, and "other" also takes the rest of the step, when the GPU
waits for the host (kernels that overlap, NCCL's beside compute, each count in full, so there the sum can exceed the
step). Which op goes where: `categorize`. Not yet run on a GPU: the CUDA path is untested.

Under DDP/FSDP rank 0 alone profiles (it writes the run dir's files); the other ranks run the NullProfiler.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, record_function

from gpt2x.config import ProfileConfig

log = logging.getLogger("gpt2x")

# categories in report order; each op's self time goes to exactly one
CATEGORIES = ("matmul", "attention", "softmax/CE", "elementwise/norms", "optimizer", "communication", "data", "other")
PROFILE_FILES = ("trace.json.gz", "profile.md", "memory_snapshot.pickle")

# The loop's labels (record_function ranges), and the category of every op inside the data and optimizer ones.
STEP_LABEL = "train/step"
REGION_LABELS = {"train/data": "data", "train/optimizer": "optimizer"}
# rows of their own in the top-operators table: time that is no op's
WAITING = "(idle while a collective runs on another thread)"
GPU_IDLE = "(GPU idle: waiting for the host)"

# Rules by op name (lower case), checked in this order; see `categorize`.
_COMMUNICATION = ("c10d", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "gloo", "nccl",
                  "record_param_comms")  # fmt: skip
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "fmha")
_SOFTMAX_CE = ("softmax", "cross_entropy", "nll_loss", "logsumexp")  # softmax also matches log_softmax
# aten::mm, aten::_addmm_activation, a fused kernel holding an addmm (triton_tem_fused_addmm_gelu_0)
_MATMUL = re.compile(r"(^aten::|_)(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)(_|$)")
# autograd's graph nodes (MmBackward0, CompiledFunctionBackward): their own time is bookkeeping, their ops are children
_AUTOGRAD_NODE = re.compile(r"Backward\d*$")
# ops that only make a view, read metadata or allocate: no arithmetic, so not elementwise
_METADATA = {
    "view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose", "permute", "expand", "expand_as",
    "as_strided", "slice", "select", "unsqueeze", "squeeze", "detach", "detach_", "alias", "empty", "empty_like",
    "empty_strided", "resize_", "split", "split_with_sizes", "chunk", "unbind", "narrow", "lift_fresh", "contiguous",
    "result_type", "is_nonzero",
}  # fmt: skip


def categorize(name: str, region: str | None = None) -> str:
    """The category of one op's self time, from its name and the loop label it runs under (`region`).

    In order: collectives (c10d, gloo, nccl) are communication wherever they run; ops under the data or optimizer
    label are data / optimizer (so are `Optimizer.*` ranges, `_foreach_*` and fused AdamW kernels); then SDPA and
    flash kernels are attention; softmax, log_softmax, cross_entropy, nll_loss, logsumexp are softmax/CE (textbook
    attention's softmax too: an op's name does not say which softmax it is); mm/addmm/bmm/matmul/linear are matmul;
    any other aten op or compiled kernel is elementwise/norms (dtype casts under autocast too), except view and
    allocation ops. Everything else is other: the loop's own labels, autograd's bookkeeping (its `evaluate_function`
    and `...Backward0` ranges: the ops they run are their children; freeing saved tensors stays with them), the Python
    of compiled graphs between their kernels; but where such time passes while a collective runs on another thread
    (DDP's gloo all-reduce during backward), it is the step waiting for that collective: communication (`split_steps`).

    Compiled graphs: inductor calls matmuls as aten ops (aten::mm), and its fused kernels are named after the ops
    they fuse (`cpp_fused__log_softmax_add_...`, `triton_red_fused_native_layer_norm_...`; on CPU the profiler turns
    inductor's kernel profiling on so that they show at all). A fused kernel goes by the first rule its name
    matches, so one that fuses a log_softmax with an add counts as softmax/CE, and the rest are elementwise/norms;
    but never attention: inductor keeps SDPA an aten call, and a kernel named after it casts or sums its tensors.
    """
    n = name.lower()
    if any(w in n for w in _COMMUNICATION):
        return "communication"
    if region is not None:
        return region
    if n.startswith("autograd::") or _AUTOGRAD_NODE.search(name):  # LogSoftmaxBackward0 is no softmax: bookkeeping
        return "other"
    if n.startswith("optimizer.") or "_foreach_" in n or "fused_adam" in n:
        return "optimizer"
    fused = "fused_" in n  # a compiled kernel, named after the ops it fuses
    if any(w in n for w in _ATTENTION) and not fused:  # inductor calls SDPA as an aten op; a fused kernel named
        return "attention"  # after it only casts or sums its inputs or gradients
    if any(w in n for w in _SOFTMAX_CE):
        return "softmax/CE"
    if _MATMUL.search(n):
        return "matmul"
    if n.startswith("aten::"):
        return "other" if n.removeprefix("aten::") in _METADATA else "elementwise/norms"
    if fused or n.startswith("triton_"):
        return "elementwise/norms"
    return "other"


def _region(name: str, parent: str | None) -> str | None:
    """The loop region an event opens (data, optimizer) or inherits from its parent."""
    if name in REGION_LABELS:
        return REGION_LABELS[name]
    return "optimizer" if name.startswith("Optimizer.") else parent


def split_steps(events, on_device: bool) -> tuple[list[float], Counter]:
    """(duration of each recorded step in µs, self µs over all of them per (op name, category)).

    `events`: the profiler's FunctionEvents. CPU: the self host time of every op nested in a step's `train/step`
    range (on its thread; the self times add up to the range's duration). Collectives that run on threads of their
    own (gloo's workers under DDP) make the step's thread wait between ops: its idle time while one is in flight goes
    to (WAITING, communication) rather than to other. `on_device` (CUDA): the self kernel time of every op that starts
    inside the range, on any thread (backward runs on autograd's own thread there); what the kernels leave of the step
    goes to (GPU_IDLE, other). Kernels that overlap (NCCL's stream beside compute) each count in full there.
    """
    steps = [e for e in events if e.name == STEP_LABEL]
    per_op: Counter = Counter()
    for step in steps:
        start, end = step.time_range.start, step.time_range.end
        # host events of other threads that overlap the step (device events are counted through their host op)
        others = [e for e in events if e.thread != step.thread and e.device_type == step.device_type
                  and start < e.time_range.end and e.time_range.start < end]  # fmt: skip
        roots = [step]
        if on_device:
            roots += [e for e in others if e.cpu_parent is None and e.time_range.start >= start]
        in_flight = _union([e.time_range for e in others if categorize(e.name) == "communication"])
        busy = 0.0
        todo = [(root, None) for root in roots]
        while todo:
            event, region = todo.pop()
            region = _region(event.name, region)
            category = categorize(event.name, region)
            cost = event.self_device_time_total if on_device else event.self_cpu_time_total
            if cost and category == "other" and in_flight and not on_device:
                waiting = _overlap(_own_time(event), in_flight)
                per_op[WAITING, "communication"] += waiting
                cost -= waiting
            if cost:
                per_op[event.name, category] += cost
            busy += cost
            todo += [(child, region) for child in event.cpu_children]
        if on_device:
            per_op[GPU_IDLE, "other"] += max(0.0, step.cpu_time_total - busy)
    return [s.cpu_time_total for s in steps], per_op


def _own_time(event) -> list[tuple[float, float]]:
    """The intervals of an event's range that none of its children cover (its self time), in µs."""
    own, cursor = [], event.time_range.start
    for child in sorted(event.cpu_children, key=lambda c: c.time_range.start):
        if child.time_range.start > cursor:
            own.append((cursor, child.time_range.start))
        cursor = max(cursor, child.time_range.end)
    if event.time_range.end > cursor:
        own.append((cursor, event.time_range.end))
    return own


def _union(ranges) -> list[tuple[float, float]]:
    """Overlapping (start, end) intervals merged, sorted."""
    merged: list[list[float]] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if merged and r.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], r.end)
        else:
            merged.append([r.start, r.end])
    return [(a, b) for a, b in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two interval lists."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


class NullProfiler:
    """profile=none: no profiler and no labels; `region` hands back one shared no-op context."""

    files: list[Path] = []

    def begin_step(self) -> None:
        """Do nothing."""

    def region(self, name: str) -> contextlib.AbstractContextManager:
        return _NO_REGION

    def end_step(self, ms: float) -> None:
        """Do nothing."""

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        return {}


_NO_REGION = contextlib.nullcontext()  # reusable: entering it does nothing


class TraceProfiler:
    """profile=trace: torch.profiler on a schedule counted from the loop's first step: wait, 1 warm-up step (traced,
    then dropped, so the profiler's own start-up is not in the figures), then `cfg.steps` recorded steps."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, device: torch.device, first_step: int, compiled: bool):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.on_device = device.type == "cuda"
        self.files: list[Path] = []
        self.step = first_step  # the optimizer step begin_step is about to start
        self.steps: list[int] = []  # recorded steps
        self.timer_ms: dict[int, float] = {}  # the StepTimer's ms of each recorded step
        self.warmup = 0
        self.step_us: list[float] = []
        self.per_op: Counter = Counter()
        self._label = None  # the open train/step range of a recorded step
        self._prof = None
        self._started = False
        self._kernel_profile = None  # inductor's setting before this run changed it
        self._memory_history = False  # CUDA allocator history being recorded (profile.memory)
        if cfg.start_step < first_step:
            log.info("profile: the run starts at step %d, after profile.start_step=%d; nothing is profiled",
                     first_step, cfg.start_step)  # fmt: skip
            return
        self.warmup = warmup = min(1, cfg.start_step - first_step)  # none when the first step is the one recorded
        wait = cfg.start_step - first_step - warmup
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_device else [])
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=cfg.steps, repeat=1),
            on_trace_ready=self._trace_ready,
            record_shapes=cfg.record_shapes,
            with_stack=cfg.with_stack,
            profile_memory=cfg.memory,
        )
        if compiled and device.type == "cpu":
            # inductor's C++ kernels record themselves only with this on (their names say what they fuse); it is
            # part of the compile cache key, so profiled runs compile their own kernels. Restored by finish().
            import torch._inductor.config as inductor_config

            # A run that raises leaves it on for the rest of the process (its later compiles still run correctly).
            self._kernel_profile = inductor_config.cpp.enable_kernel_profile
            inductor_config.cpp.enable_kernel_profile = True
        if cfg.memory and not self.on_device:
            log.info("profile.memory: the allocator snapshot (memory_snapshot.pickle) is CUDA-only; on %s only the "
                     "trace records allocations", device.type)  # fmt: skip

    @property
    def collecting(self) -> bool:
        """Whether the profiler records the current step (its warm-up or recorded steps)."""
        return self._prof is not None and self._prof.current_action != ProfilerAction.NONE

    def begin_step(self) -> None:
        """Start step `self.step`: advance the schedule (which writes the trace after the last recorded step) and,
        when this step is recorded, open its `train/step` range."""
        if self._prof is None:
            return
        if self._started:
            self._prof.step()
        else:  # the schedule counts from here, the loop's first step
            self._prof.start()
            self._started = True
        if self.collecting:
            if self.on_device and self.cfg.memory and not self._memory_history:
                torch.cuda.memory._record_memory_history(max_entries=100_000)  # every alloc/free, with its stack
                self._memory_history = True
            self._label = record_function(STEP_LABEL)
            self._label.__enter__()

    def region(self, name: str) -> contextlib.AbstractContextManager:
        """A `train/<name>` range in the trace while the step is recorded, else a no-op."""
        return record_function(f"train/{name}") if self._label is not None else _NO_REGION

    def end_step(self, ms: float) -> None:
        """Close the step's range; `ms`: the StepTimer's time of the step, compared with the trace's in profile.md."""
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None
            if self._prof.current_action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE):
                self.steps.append(self.step)
                self.timer_ms[self.step] = ms
        self.step += 1

    def _trace_ready(self, prof) -> None:
        """After the last recorded step: write the trace (and memory snapshot), keep the split for profile.md."""
        path = self.run_dir / "trace.json.gz"
        prof.export_chrome_trace(str(path))
        self.files.append(path)
        self.step_us, self.per_op = split_steps(prof.events(), self.on_device)
        if self.on_device and self.cfg.memory:
            snapshot = self.run_dir / "memory_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.files.append(snapshot)
        log.info("profile: trace of steps %s written to %s (open in https://ui.perfetto.dev)", self.steps, path)

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Stop the profiler (a run that ends inside the recorded steps keeps the steps it recorded), write
        profile.md, and return the figures for summary.json; `results`: the run's summary so far."""
        if self._started:
            self._prof.__exit__(None, None, None)  # stop; inside the recorded steps this calls _trace_ready
        if self._kernel_profile is not None:
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = self._kernel_profile
        if not self.step_us:
            if self._prof is not None:
                log.warning("profile: no step was recorded (the run ended before profile.start_step=%d)",
                            self.cfg.start_step)  # fmt: skip
            return {}
        n = len(self.step_us)
        step_ms = sum(self.step_us) / n / 1000
        by_category = {c: 0.0 for c in CATEGORIES}
        for (_, category), us in self.per_op.items():
            by_category[category] += us / n / 1000
        timer_ms = [self.timer_ms[s] for s in self.steps[:n] if s in self.timer_ms]
        figures = {
            "profile_ms": by_category,
            "profile_step_ms": step_ms,
            "profile_timer_ms": statistics.mean(timer_ms) if timer_ms else None,
            "profile_steps": self.steps[:n],
            "profile_warmup_steps": self.warmup,
            "profile_basis": "gpu" if self.on_device else "cpu",
        }
        path = self.run_dir / "profile.md"
        path.write_text(render_profile(figures, self.per_op, n, results, self.cfg.top_ops), encoding="utf-8")
        self.files.append(path)
        log.info("profile: %s", ", ".join(f"{c} {ms:.1f} ms" for c, ms in by_category.items() if ms >= 0.05))
        return figures


PROFILERS = {"none": NullProfiler, "trace": TraceProfiler}


def check_profile(cfg: ProfileConfig, max_steps: int) -> None:
    """Fail before training on a profile setting that cannot record: an unknown name, steps outside the run."""
    if cfg.name not in PROFILERS:
        raise ValueError(f"profile={cfg.name!r} is unknown; valid: {', '.join(PROFILERS)}")
    if cfg.name == "none":
        return
    if cfg.steps < 1 or cfg.start_step < 0 or cfg.top_ops < 1:
        raise ValueError(f"profile.steps={cfg.steps}, profile.start_step={cfg.start_step}, profile.top_ops="
                         f"{cfg.top_ops}: need steps >= 1, start_step >= 0 and top_ops >= 1")  # fmt: skip
    if cfg.start_step + cfg.steps > max_steps:
        raise ValueError(
            f"profile.start_step={cfg.start_step} + profile.steps={cfg.steps} runs past optim.max_steps={max_steps}; "
            f"use profile.start_step<={max(0, max_steps - cfg.steps)}, fewer profile.steps or more optim.max_steps"
        )


def build_profiler(cfg, run_dir: Path, is_main: bool, device: torch.device, first_step: int):
    """The run's profiler: a TraceProfiler on rank 0 under profile=trace, else the NullProfiler."""
    if cfg.profile.name == "none" or not is_main:
        return NullProfiler()
    return TraceProfiler(cfg.profile, run_dir, device, first_step, compiled=cfg.compile.name != "none")


# -- profile.md and the sweep report --------------------------------------------------------------------------------


def render_profile(figures: dict[str, Any], per_op: Counter, n: int, results: dict[str, Any], top: int) -> str:
    """profile.md: what was recorded, the split by category, and the top operators by self time."""
    step_ms, timer_ms = figures["profile_step_ms"], figures["profile_timer_ms"]
    basis = ("GPU kernel time of each op; `other` includes the time the GPU waits for the host"
             if figures["profile_basis"] == "gpu" else "host (CPU) time of each op")  # fmt: skip
    lines = ["# Where the time goes", ""]
    warmup = figures["profile_warmup_steps"]
    lines.append(f"- recorded steps: {', '.join(map(str, figures['profile_steps']))} (after {warmup} profiler warm-up "
                 "step); figures are means per step")  # fmt: skip
    lines.append(f"- step time: {step_ms:,.1f} ms, the mean of the trace's `{STEP_LABEL}` ranges" + (
        f"; the StepTimer measured {timer_ms:,.1f} ms for the same steps" if timer_ms else ""))  # fmt: skip
    if results.get("ms_per_batch"):
        overhead = (timer_ms or step_ms) / results["ms_per_batch"] - 1
        lines.append(f"- the run's median step (all timed steps, these included): {results['ms_per_batch']:,.1f} ms; "
                     f"the recorded steps: {overhead:+.0%} against it (profiler overhead and noise)")  # fmt: skip
    lines.append(f"- counted: the self time ({basis}), so each op counts once and the categories add up to the step")
    lines.append("- trace: `trace.json.gz` (https://ui.perfetto.dev or chrome://tracing); the loop's ranges are "
                 f"`{STEP_LABEL}`, `train/data`, `train/forward`, `train/backward`, `train/optimizer`")  # fmt: skip
    lines += ["", "## By category", "", "| category | ms/step | share |", "|---|---:|---:|"]
    for category, ms in figures["profile_ms"].items():
        lines.append(f"| {category} | {ms:,.2f} | {ms / step_ms:.1%} |")
    total = sum(figures["profile_ms"].values())
    lines.append(f"| **total** | **{total:,.2f}** | **{total / step_ms:.1%}** |")
    lines += ["", "Rules (gpt2x/run/profile.py `categorize`): " + " ".join(categorize.__doc__.split("\n\n")[1].split())]
    lines += ["", f"## Top {top} operators by self time", "",
              "| # | operator | category | ms/step | share |", "|---:|---|---|---:|---:|"]  # fmt: skip
    for i, ((name, category), us) in enumerate(per_op.most_common(top), 1):
        ms = us / n / 1000
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| {i} | `{short}` | {category} | {ms:,.2f} | {ms / step_ms:.1%} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep report's split table: one row per profiled run, ms per step and share of each category."""
    lines = [
        "## Where the time goes (profile=trace)",
        "",
        "ms per recorded step by category (share of the step); self times, so the categories add up to the step. "
        "Rules: gpt2x/run/profile.py; each run's top operators: `<run dir>/profile.md`.",
        "",
        "| # | run | step ms | " + " | ".join(CATEGORIES) + " |",
        "|---:|---|---:|" + "---:|" * len(CATEGORIES),
    ]
    for r in rows:
        if not r.get("profile_ms"):
            continue
        step = r["profile_step_ms"]
        cells = [f"{r['profile_ms'].get(c, 0):,.1f} ({r['profile_ms'].get(c, 0) / step:.0%})" for c in CATEGORIES]
        job = "-" if r["job"] is None else str(r["job"])
        lines.append(f"| {job} | {r['run']} | {step:,.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Stacked bars per profiled run: ms per step by category (left) and each category's share (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("profile_ms")]
    labels = [r["run"] for r in rows]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 4), 5))
    for ax, share in zip(axes, (False, True), strict=True):
        bottom = [0.0] * len(rows)
        for color, category in zip(colors, CATEGORIES, strict=False):
            values = [r["profile_ms"].get(category, 0) / (r["profile_step_ms"] if share else 1) * (100 if share else 1)
                      for r in rows]  # fmt: skip
            ax.bar(range(len(rows)), values, bottom=bottom, color=color, label=category)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30 if max(map(len, labels), default=0) > 6 else 0, ha="right", fontsize=9)
        ax.set_ylabel("share of the step (%)" if share else "ms per step")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"{title}: where the time of a step goes (profile=trace, self times)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
