"""Honest speed figures: model FLOPs, device peak FLOP/s, MFU, peak memory and the timing summary."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from gpt2x.config import ModelConfig

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, per compute dtype. Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
GPU_PEAK_FLOPS = {
    "H200": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12},
    "H100 PCIe": {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12, "float16": 756e12},
    "H100": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12},
    "A100": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12},
    "A10G": {"float32": 31.2e12, "tf32": 62.5e12, "bfloat16": 125e12, "float16": 125e12},
    "L4": {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12, "float16": 121e12},
    "RTX 4090": {"float32": 82.6e12, "tf32": 82.6e12, "bfloat16": 165.2e12, "float16": 165.2e12},
    "V100": {"float32": 15.7e12, "tf32": 15.7e12, "bfloat16": 15.7e12, "float16": 125e12},
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) as in the PaLM paper / nanoGPT: 6N + 12*L*d*T.

    N counts every matmul weight the token passes through: the blocks and the (tied) output layer, not the
    position table, which is a lookup. The second term is attention's QK^T and AV, which have no parameters.
    """
    d, L = cfg.n_embd, cfg.n_layer
    block = 12 * d * d + 13 * d  # c_attn (3d^2+3d), c_proj (d^2+d), c_fc (4d^2+4d), c_proj (4d^2+d), 2 LayerNorms (4d)
    n = L * block + 2 * d + cfg.vocab_size * d  # + ln_f, + lm_head (== wte)
    return 6 * n + 12 * L * d * seq_len


def gpu_peak_flops(device_name: str, dtype_key: str) -> float | None:
    """Data-sheet peak for a known GPU, or None."""
    for name, peaks in GPU_PEAK_FLOPS.items():
        if name in device_name:
            return peaks[dtype_key]
    return None


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls in `dtype`: the practical peak on devices without a data sheet (CPUs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: thread pools, packing buffers
        a @ b
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def peak_flops(device: torch.device, dtype: torch.dtype, tf32: bool, cache_dir: str | None, fresh: bool = False) -> float:
    """Peak FLOP/s that MFU is measured against: the data sheet for known GPUs, else a matmul probe (cached)."""
    dtype_key = "tf32" if (dtype == torch.float32 and tf32) else str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name, dtype_key)
        if known is not None:
            return known
    key = f"{device.type}|{device_name(device)}|{torch.get_num_threads()}|{dtype_key}"
    cache = Path(cache_dir).expanduser() / "peak_flops.json" if cache_dir else None
    cached = json.loads(cache.read_text()) if cache and cache.exists() else {}
    if not fresh and key in cached:
        return cached[key]
    measured = measure_matmul_flops(dtype, device)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: measured}, indent=1))
        os.replace(tmp, cache)
    return measured


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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated, or the process's peak resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timing_summary(step_ms: list[float], tokens_per_step: int, flops_per_tok: int, peak: float) -> dict:
    """Median / p10 / p90 ms per optimizer step, tokens/s and MFU over the measured (post-warm-up) steps."""
    if not step_ms:
        return {}
    median = statistics.median(step_ms)
    tokens_per_sec = tokens_per_step / (median / 1000)
    return {
        "ms_per_batch": median,
        "ms_per_batch_p10": percentile(step_ms, 10),
        "ms_per_batch_p90": percentile(step_ms, 90),
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_tok * tokens_per_sec / peak,
        "timed_steps": len(step_ms),
    }
