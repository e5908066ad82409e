"""Honest speed figures: model FLOPs, device peak FLOP/s, MFU, peak memory and the timing summary.

MFU (model FLOPs utilization, PaLM appendix B) = model FLOPs per token x tokens/s / peak FLOP/s of the device for the
dtype the matmuls run in. The peak comes from a data-sheet table for known GPUs, from `peak_flops=...` when set, or,
on devices without a data sheet (CPUs), from a matmul probe of that dtype, measured once and cached, or measured afresh
right before the run with `peak_probe=fresh` (what the ladder does, so every rung is judged against the machine as it
is at that moment, not as it was when the cache was filled).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from gpt2x.config import ModelConfig
from gpt2x.data.tokenizer import N_VOCAB  # GPT-2's real vocabulary; rows beyond it are padding

log = logging.getLogger(__name__)

PEAK_PROBES = ("cached", "fresh")

# Dense (no sparsity: the data sheets' "with sparsity" figures halved) peak FLOP/s per compute dtype, from the vendors'
# data sheets. Keyed by the exact torch.cuda.get_device_name(): a substring would match "NVIDIA L4" inside
# "NVIDIA L40S" and "A100" inside "NVIDIA RTX A1000". GeForce/RTX cards list the rate with fp32 accumulation (what
# autocast's matmuls use). GPUs without TF32 units list their fp32 rate under tf32 (matmuls stay fp32 there), and
# V100/T4 list no bfloat16 (it is emulated and refused; see gpt2x/precision.py).
_HOPPER_SXM = {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12}
_HOPPER_PCIE = {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12, "float16": 756e12}
_HOPPER_NVL = {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12}
_AMPERE_100 = {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12}
_A10 = {"float32": 31.2e12, "tf32": 62.5e12, "bfloat16": 125e12, "float16": 125e12}
_V100_SXM = {"float32": 15.7e12, "tf32": 15.7e12, "float16": 125e12}
_V100_PCIE = {"float32": 14e12, "tf32": 14e12, "float16": 112e12}
GPU_PEAK_FLOPS = {
    "NVIDIA B200": {"float32": 75e12, "tf32": 1125e12, "bfloat16": 2250e12, "float16": 2250e12},
    "NVIDIA H200": _HOPPER_SXM,
    "NVIDIA H200 NVL": _HOPPER_NVL,
    "NVIDIA GH200 480GB": _HOPPER_SXM,
    "NVIDIA H100 80GB HBM3": _HOPPER_SXM,
    "NVIDIA H100": _HOPPER_SXM,  # the 64/94 GB SXM parts
    "NVIDIA H100 PCIe": _HOPPER_PCIE,
    "NVIDIA H100 NVL": _HOPPER_NVL,
    "NVIDIA H800": _HOPPER_SXM,
    "NVIDIA H800 PCIe": _HOPPER_PCIE,
    "NVIDIA H20": {"float32": 44e12, "tf32": 74e12, "bfloat16": 148e12, "float16": 148e12},
    "NVIDIA A100-SXM4-40GB": _AMPERE_100,
    "NVIDIA A100-SXM4-80GB": _AMPERE_100,
    "NVIDIA A100-PCIE-40GB": _AMPERE_100,
    "NVIDIA A100 80GB PCIe": _AMPERE_100,
    "NVIDIA A800-SXM4-80GB": _AMPERE_100,
    "NVIDIA A800 80GB PCIe": _AMPERE_100,
    "NVIDIA A10": _A10,
    "NVIDIA A10G": _A10,
    "NVIDIA L4": {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12, "float16": 121e12},
    "NVIDIA L40": {"float32": 90.5e12, "tf32": 90.5e12, "bfloat16": 181e12, "float16": 181e12},
    "NVIDIA L40S": {"float32": 91.6e12, "tf32": 183e12, "bfloat16": 362e12, "float16": 362e12},
    "NVIDIA RTX A6000": {"float32": 38.7e12, "tf32": 77.4e12, "bfloat16": 154.8e12, "float16": 154.8e12},
    "NVIDIA GeForce RTX 3090": {"float32": 35.6e12, "tf32": 35.6e12, "bfloat16": 71e12, "float16": 71e12},
    "NVIDIA GeForce RTX 4090": {"float32": 82.6e12, "tf32": 82.6e12, "bfloat16": 165.2e12, "float16": 165.2e12},
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
    "Tesla T4": {"float32": 8.1e12, "tf32": 8.1e12, "float16": 65e12},
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) as in the PaLM paper / nanoGPT: 6N + 12*L*d*T.

    N counts every weight the token's matmuls use: the blocks and the (tied) output layer over the real 50257-token
    vocabulary, not the position table, which is a lookup. Padding rows (model.vocab_size=50304) are left out: they
    are computed but are no useful work, and counting them would let padding raise MFU by itself. The second term is
    attention's QK^T and AV (2 matmuls x 2 FLOPs x T*d per token per layer, x3 for forward + backward), counted over
    the full T x T square as PaLM does, although a causal kernel may skip the masked half.
    """
    d, L = cfg.n_embd, cfg.n_layer
    block = 12 * d * d + 13 * d  # c_attn (3d^2+3d), c_proj (d^2+d), c_fc (4d^2+4d), c_proj (4d^2+d), 2 LayerNorms (4d)
    n = L * block + 2 * d + min(cfg.vocab_size, N_VOCAB) * d  # + ln_f, + lm_head (== wte)
    return 6 * n + 12 * L * d * seq_len


def mfu(flops_per_tok: float, tokens_per_sec: float, peak: float) -> float:
    """Model FLOPs utilization: the fraction of the device's peak FLOP/s that the model's own FLOPs account for."""
    return flops_per_tok * tokens_per_sec / peak


def gpu_peak_flops(device_name: str, dtype_key: str) -> float | None:
    """Data-sheet peak of a GPU named exactly `device_name` for `dtype_key`, or None (unknown GPU, MIG slice, or a
    dtype its data sheet does not list).

    A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") has a fraction of the GPU's units, so it gets no data-sheet
    figure; the probe measures what the slice does.
    """
    return GPU_PEAK_FLOPS.get(device_name.strip(), {}).get(dtype_key)


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls in `dtype`: the practical peak on devices without a data sheet (CPUs).

    The size starts where the device's matmuls are efficient (512 on CPU, 2048 on GPUs) and doubles until one matmul
    takes >= 20 ms or reaches the cap: large enough for the steady state, small enough that a slow dtype (float16 on
    a CPU without fp16 units) still probes in about a second.
    """
    n, cap = (512, 1024) if device.type == "cpu" else (2048, 8192)
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: thread pools, packing buffers, kernel selection
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        if time.perf_counter() - t0 >= 0.02 or n >= cap:
            break
        n *= 2
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    # the fastest repeat, not the median: a peak is the best the device does, and on a shared machine the slower
    # repeats measure the neighbours
    return 2 * n**3 / min(times)


def dtype_key(dtype: torch.dtype, tf32: bool) -> str:
    """The name peaks are listed under: float32, tf32, bfloat16, float16."""
    return "tf32" if (dtype == torch.float32 and tf32) else str(dtype).removeprefix("torch.")


def check_peak_settings(probe: str, override: float | None) -> None:
    """Fail before training on a peak_probe mode that does not exist or a non-positive peak_flops."""
    if probe not in PEAK_PROBES:
        raise ValueError(f"peak_probe={probe!r} is not a probe mode; valid: {', '.join(PEAK_PROBES)}")
    if override is not None and override <= 0:
        raise ValueError(f"peak_flops={override} must be positive (FLOP/s, e.g. 989.4e12), or null to look it up")


def peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    tf32: bool,
    cache_dir: str | None,
    probe: str = "cached",
    override: float | None = None,
) -> tuple[float, str]:
    """Peak FLOP/s that MFU is measured against, and where the figure came from.

    `override` (the `peak_flops` setting) wins; then the data sheet for known GPUs; else a matmul probe in `dtype` on
    this device: reused from `cache_dir/peak_flops.json` with probe=cached, measured now (and cached) with probe=fresh.
    The cache key holds the device name, thread count, dtype and float32 matmul precision, so a different setting
    never reuses another's figure.
    """
    check_peak_settings(probe, override)
    if override is not None:
        return float(override), "peak_flops setting"
    key_name = dtype_key(dtype, tf32)
    why = ""  # on a GPU, why its data sheet was not used
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(gpu, key_name)
        if known is not None:
            return known, f"data sheet ({gpu}, {key_name})"
        why = f"; {gpu}: " + ("a MIG slice" if " MIG " in f"{gpu} " else "no data-sheet entry")
        log.warning(
            "no data-sheet peak for %r (%s): MFU is measured against a matmul probe of this GPU, which is not "
            "comparable with other GPUs' data-sheet MFU; set peak_flops=<FLOP/s> to use the data sheet's figure",
            gpu, key_name,
        )  # fmt: skip
    key = "|".join(
        [device.type, device_name(device), f"threads={torch.get_num_threads()}", key_name,
         f"matmul={torch.get_float32_matmul_precision()}"]
    )  # fmt: skip
    cache = Path(cache_dir).expanduser() / "peak_flops.json" if cache_dir else None
    cached = _read_json(cache)
    if probe == "cached" and key in cached:
        if _is_peak(cached[key]):
            return float(cached[key]), f"matmul probe ({key_name}, cached{why})"
        # hand-edited or damaged: a negative or text peak would make every MFU of the run wrong
        log.warning("%s holds %r for %s, not a positive FLOP/s figure; measuring again", cache, cached[key], key)
    measured = measure_matmul_flops(dtype, device)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_read_json(cache), key: measured}, indent=1))
        os.replace(tmp, cache)  # atomic: concurrent runs never read half a file
    return measured, f"matmul probe ({key_name}, {'fresh' if probe == 'fresh' else 'first measurement'}{why})"


def _is_peak(value) -> bool:
    """A usable peak: a finite positive number (JSON can hold a string, a negative, or a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _read_json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path and path.exists() else {}
    except (OSError, ValueError):  # a corrupt cache is re-measured, not fatal
        return {}


def device_name(device: torch.device) -> str:
    """Human-readable device name for records and reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory accounting afresh, so runs sharing a process (a Hydra multirun) each report their own peak.

    CUDA: the caching allocator's counters. Elsewhere on Linux: writing 5 to /proc/self/clear_refs resets the
    process's high-water mark of resident memory (VmHWM) to its current size.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: ru_maxrss below is the process-lifetime peak


def run_and_release(fn, *args):
    """`fn(*args)`, then free what the job held, also when it failed, so the next job of a multirun starts clean.

    A raised exception keeps the frames of the failed job alive through its traceback, and with them its model,
    optimizer and batches (GPU memory the next rung's peak_mem would include). Clearing those frames' locals keeps
    the traceback printable (files, lines) but lets their tensors go; then the CUDA cache is returned and the peak
    counter reset.
    """
    try:
        return fn(*args)
    except BaseException as e:
        error: BaseException | None = e
        while error is not None:  # the exception and the ones it was raised from or during
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        raise
    finally:
        gc.collect()
        if torch.cuda.is_initialized():  # never create a CUDA context in a launcher process that had none
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process since `reset_peak_memory`: CUDA max allocated, else the peak resident set size.

    On CPU this is the whole process (Python, torch's libraries and the data included, ~0.4 GiB before any model).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def percentile(values: list[float], q: int) -> float:
    """Linear-interpolated percentile (q in 1..99) of a non-empty list (statistics' inclusive method)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class StepTimer:
    """Times each optimizer step, device-synced; the first `warmup_steps` (allocator warm-up, compilation) are kept
    apart from the timed ones. MFU is against the whole job's peak: `peak_flops` (one device) x `world_size`."""

    def __init__(self, device, warmup_steps: int, tokens_per_step: int, flops_per_tok: int, peak: float, world: int):
        self.device, self.warmup_steps = device, warmup_steps
        self.tokens_per_step, self.flops_per_tok, self.job_peak = tokens_per_step, flops_per_tok, peak * world
        self.step_ms: list[float] = []
        self.warmup_ms: list[float] = []
        self.t0 = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        """End the step; its ms_per_batch, tokens_per_sec and mfu."""
        synchronize(self.device)
        ms = (time.perf_counter() - self.t0) * 1000
        (self.warmup_ms if len(self.warmup_ms) < self.warmup_steps else self.step_ms).append(ms)
        tokens_per_sec = self.tokens_per_step / (ms / 1000)
        return {"ms_per_batch": ms, "tokens_per_sec": tokens_per_sec, "mfu": mfu(self.flops_per_tok, tokens_per_sec,
                                                                                   self.job_peak)}  # fmt: skip

    def summary(self) -> dict:
        """Median / p10 / p90 ms per step, tokens/s and MFU over the timed steps (see `timing_summary`)."""
        return timing_summary(self.step_ms, self.tokens_per_step, self.flops_per_tok, self.job_peak, self.warmup_ms)


def timing_summary(
    step_ms: list[float], tokens_per_step: int, flops_per_tok: int, peak: float, warmup_ms: list[float] | None = None
) -> dict:
    """Median / p10 / p90 ms per optimizer step, tokens/s and MFU over the measured (post-warm-up) steps.

    `warmup_ms` are the steps left out (allocator warm-up, compilation); their total is reported on its own, so the
    one-off cost of compiling is visible without polluting the steady-state figure.
    """
    out = {"timed_steps": len(step_ms)}
    if warmup_ms:
        out |= {"warmup_steps": len(warmup_ms), "warmup_s": sum(warmup_ms) / 1000}
    if not step_ms:
        log.warning(
            "no timed steps: every step was a warm-up step (timing_warmup_steps >= optim.max_steps); "
            "the summary has no ms/batch, tokens/s or MFU"
        )
        return out
    median = statistics.median(step_ms)
    tokens_per_sec = tokens_per_step / (median / 1000)
    return out | {
        "ms_per_batch": median,
        "ms_per_batch_p10": percentile(step_ms, 10),
        "ms_per_batch_p90": percentile(step_ms, 90),
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu(flops_per_tok, tokens_per_sec, peak),
    }
