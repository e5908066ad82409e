"""The CUDA paths' logic, pinned on CPU (issue 14): what would fail or mislead on a first GPU run.

Each test runs the part of a CUDA path that does not need a GPU: the rule with the counts passed in, the table with
real device names, the composed config, the dtype that reaches a kernel under the run's autocast. tests/test_cuda.py
runs the rest where a GPU is present.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF_DIR, compose, run_train
from omegaconf import OmegaConf

from gpt2x.config import ModelConfig
from gpt2x.extras import import_extra
from gpt2x.model import attention
from gpt2x.model.gpt import GPT
from gpt2x.model.loss import linear_cross_entropy
from gpt2x.optim import build_optimizer
from gpt2x.run import checkpoint
from gpt2x.run.metrics import GPU_PEAK_FLOPS, gpu_peak_flops, run_and_release
from gpt2x.sample import main as sample_main
from gpt2x.sample import sampling_attention
from gpt2x.speed import parallel
from gpt2x.validate import grad_accum_steps

CPU = torch.device("cpu")


def _dtype_spy(monkeypatch, name: str) -> list[torch.dtype]:
    """Wrap the real kernel `name` so that each call records the dtype of q reaching it."""
    seen, kernel = [], attention.ATTENTION_KERNELS[name]

    def spy(q, k, v, window=None):
        seen.append(q.dtype)
        return kernel(q, k, v, window)

    monkeypatch.setitem(attention.ATTENTION_KERNELS, name, spy)
    return seen


# -- 1. sampling, evaluation and HellaSwag under the run's precision ---------------------------------------------------


@pytest.mark.slow
def test_trainer_samples_and_evaluates_under_the_runs_autocast_like_training(monkeypatch, tmp_path):
    seen = _dtype_spy(monkeypatch, "flash")
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text('{"ctx": "A man", "endings": ["runs.", "sits.", "eats.", "is."], "label": 0}\n')
    summary = run_train(
        tmp_path / "run",
        ["precision=bf16", "attention=flash", "optim.max_steps=1", "hellaswag_interval=1",
         f"hellaswag_path={hellaswag}"],
    )  # fmt: skip
    assert summary["steps"] == 1
    # 2 layers x (1 training micro-step, 1 eval batch, 1 HellaSwag example, sample_max_tokens=4 sampling steps)
    assert len(seen) >= 2 * (1 + 1 + 1 + 4)
    assert set(seen) == {torch.bfloat16}  # on CUDA a float32 call here is "No available kernel"


def test_gpt2x_sample_runs_its_forward_passes_in_the_dtype_asked_for(monkeypatch, hf_gpt2_dir):
    seen = _dtype_spy(monkeypatch, "sdpa")
    args = ["--pretrained", str(hf_gpt2_dir), "--num-samples", "1", "--max-tokens", "3"]
    sample_main(args + ["--dtype", "bfloat16"])
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    sample_main(args)  # auto: float32 on a CPU
    assert seen and set(seen) == {torch.float32}


@pytest.mark.slow
def test_the_gpt2x_sample_command_prints_samples_and_exits_0(hf_gpt2_dir):
    command = [str(Path(sys.executable).parent / "gpt2x-sample"), "--pretrained", str(hf_gpt2_dir), "--prompt", "Hi",
               "--num-samples", "1", "--max-tokens", "2", "--dtype", "bfloat16"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]  # check.sh's sampling step counts on it
    assert done.stdout.startswith("--- sample 0\nHi")


def test_sampling_keeps_the_trained_kernel_where_it_runs_and_falls_back_to_sdpa_where_not():
    assert sampling_attention("flash", CPU, torch.float32) == "flash"  # CPU flash has a float32 kernel
    assert sampling_attention("efficient", CPU, torch.float32) == "sdpa"  # CUDA-only kernel
    assert sampling_attention("manual", CPU, torch.bfloat16) == "manual"


# -- 2. no more NCCL workers than GPUs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "local_world_size, visible_gpus, backend, one_gpu_per_task",
    [
        (1, 1, "nccl", False),
        (8, 8, "nccl", False),
        (4, 8, "nccl", False),
        (2, 0, "gloo", False),
        (8, 1, "nccl", True),
    ],
)
def test_workers_that_each_have_a_gpu_are_accepted(local_world_size, visible_gpus, backend, one_gpu_per_task):
    parallel.check_workers_fit_gpus(local_world_size, visible_gpus, backend, one_gpu_per_task)


@pytest.mark.parametrize(
    "local_world_size, visible_gpus, one_gpu_per_task", [(2, 1, False), (8, 4, False), (8, 4, True), (3, 2, True)]
)
def test_more_nccl_workers_than_visible_gpus_are_refused_naming_nproc_per_node(
    local_world_size, visible_gpus, one_gpu_per_task
):
    with pytest.raises(ValueError, match=rf"{local_world_size} worker processes .* only {visible_gpus} visible GPU.*"
                                         rf"parallel.nproc_per_node<={visible_gpus}"):  # fmt: skip
        parallel.check_workers_fit_gpus(local_world_size, visible_gpus, "nccl", one_gpu_per_task)


# -- 3. MFU peaks by exact GPU name ------------------------------------------------------------------------------------

REAL_DEVICE_NAMES = {  # torch.cuda.get_device_name() -> dense bf16 peak (None: no data sheet -> matmul probe)
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.4e12,
    "NVIDIA H800": 989.4e12,
    "NVIDIA H20": 148e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA A10G": 125e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA RTX A6000": 154.8e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,
    "NVIDIA RTX A1000": None,  # not an A100
    "NVIDIA H100 80GB HBM3 MIG 1g.10gb": None,  # a slice: probed
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb": None,
    "Tesla V100-SXM2-16GB": None,  # bfloat16 is emulated there (and refused)
    "Some Future GPU": None,
}


@pytest.mark.parametrize("name", REAL_DEVICE_NAMES)
def test_gpu_peaks_come_from_the_exact_device_name_and_mig_slices_get_none(name):
    assert gpu_peak_flops(name, "bfloat16") == REAL_DEVICE_NAMES[name]


def test_every_listed_gpu_has_dense_peaks_ordered_fp32_tf32_half():
    for name, peaks in GPU_PEAK_FLOPS.items():
        half = peaks["float16"]
        assert peaks["float32"] <= peaks["tf32"] <= half, name
        assert peaks.get("bfloat16", half) == half, name
    assert gpu_peak_flops("NVIDIA L40S", "tf32") == 183e12 and gpu_peak_flops("NVIDIA L4", "tf32") == 60e12
    assert gpu_peak_flops("Tesla T4", "float16") == 65e12


# -- 4 and 6. the GPU ladder compares what it says, on one token budget ------------------------------------------------

LADDER = OmegaConf.load(CONF_DIR / "experiment" / "ladder.yaml").hydra.sweeper.params.rung


@pytest.mark.parametrize("experiment", ["ladder", "ladder_gpu"])
def test_rungs_before_fused_adamw_step_with_the_for_loop_adamw(experiment):
    model = GPT(ModelConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    rungs = LADDER.split(",")
    for rung in rungs[: rungs.index("fused_adamw")]:
        cfg = compose([f"+experiment={experiment}", f"rung={rung}"])
        assert cfg.optim.foreach is False and cfg.optim.fused is False, rung
        optimizer = build_optimizer(model, cfg.optim, "cuda")  # what the GPU ladder would build
        assert (optimizer.defaults["foreach"], optimizer.defaults["fused"]) == (False, False), rung
    fused = compose([f"+experiment={experiment}", "rung=fused_adamw"])
    assert build_optimizer(model, fused.optim, "cpu").defaults["fused"] is True


def test_fused_and_foreach_adamw_together_are_refused_naming_both():
    cfg = compose(["optim.fused=true", "optim.foreach=true"])
    with pytest.raises(ValueError, match="optim.fused=true and optim.foreach=true"):
        build_optimizer(GPT(ModelConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)), cfg.optim, "cpu")


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_ladder_gpu_tokens_per_step_divide_for_1_2_4_and_8_gpus(gpus):
    rung = "ddp" if gpus > 1 else "fused_ce"
    cfg = compose(["+experiment=ladder_gpu", f"rung={rung}", f"parallel.nproc_per_node={gpus}"])
    accum = grad_accum_steps(cfg, gpus)
    assert accum * gpus * cfg.data.batch_size * cfg.data.seq_len == cfg.data.total_batch_size == 131072
    assert accum == 8 // gpus


# -- 9, 10, 11, 12, 13. checkpoints, process group, multirun memory, SLURM, compile workers ---------------------------


def test_checkpoints_load_memory_mapped_so_the_ranks_of_a_node_share_the_page_cache(tmp_path):
    state = {"model": {"w": torch.randn(64, 64)}, "optimizer": {}, "step": 3}
    path = checkpoint.save(tmp_path, 3, state, keep=1)
    loaded = checkpoint.load(path)
    assert str(path) in open("/proc/self/maps").read()  # the file is mapped, not read into private memory
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 3


def test_process_group_waits_parallel_timeout_minutes_default_30():
    assert parallel.process_group_options(compose(["parallel=ddp"]).parallel, CPU) == {
        "backend": "gloo",
        "timeout": datetime.timedelta(minutes=30),
        "device_id": None,
    }
    cfg = compose(["parallel=fsdp", "parallel.timeout_minutes=120"]).parallel
    assert parallel.process_group_options(cfg, CPU)["timeout"] == datetime.timedelta(hours=2)
    with pytest.raises(ValueError, match="parallel.timeout_minutes=0 must be positive"):
        cfg = compose(["parallel=ddp", "parallel.timeout_minutes=0"])
        parallel.check_parallel(cfg.parallel, cfg.precision, CPU, 2)


def test_a_failed_job_lets_go_of_its_tensors_while_its_error_is_still_held():
    held = []

    def job():
        model = torch.nn.Linear(256, 256)
        held.append(weakref.ref(model.weight))
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError, match="job failed") as failure:
        run_and_release(job)
    assert failure.value.__traceback__ is not None  # the error and its traceback are still alive, as in Hydra ...
    assert held[0]() is None  # ... but the failed job's weights are gone


def test_slurm_launcher_kills_the_step_when_one_task_fails():
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    launcher = compose(["hydra/launcher=slurm", "parallel=ddp"], return_hydra_config=True).hydra.launcher
    assert "--kill-on-bad-exit=1" in launcher.srun_args
    assert "srun_args" in SlurmExecutor._valid_parameters()  # the plugin hands it to submitit as slurm_srun_args
    script = _make_sbatch_string(command="python -m x", folder=tempfile.mkdtemp(), srun_args=list(launcher.srun_args))
    assert any(line.startswith("srun ") and "--kill-on-bad-exit=1" in line for line in script.splitlines())


@pytest.mark.parametrize(
    "cpus, local_world_size, threads", [(32, 8, 4), (128, 8, 16), (256, 1, 32), (16, 1, 16), (4, 8, 1), (13, 2, 6)]
)
def test_inductor_compile_workers_are_shared_among_the_ranks_of_a_node(cpus, local_world_size, threads):
    assert parallel.compile_threads_per_worker(cpus, local_world_size) == threads


# -- 14. fused cross-entropy under fp16 keeps small gradients ----------------------------------------------------------


def test_fused_ce_under_fp16_autocast_keeps_the_gradients_of_improbable_tokens():
    # 4 tokens, 8 features, 16 vocab rows; rows 8.. score ~24 nats below the rest, so their softmax probability is
    # ~1e-12, below float16's smallest subnormal (6e-8): cast to fp16 before loss scaling, their gradients vanish.
    torch.manual_seed(0)
    x = 1 + 0.1 * torch.randn(4, 8)
    weight = 0.1 * torch.randn(16, 8)
    weight[8:] = -3 + 0.01 * torch.randn(8, 8)
    targets = torch.tensor([0, 1, 2, 3])
    w_ref = weight.clone().requires_grad_()
    F.cross_entropy(x @ w_ref.t(), targets).backward()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):  # a handful of elements: fp16 on CPU is fine at this size
        loss = linear_cross_entropy(x, w, targets)
    loss.backward()
    rare = w_ref.grad[8:]
    assert 0 < rare.abs().max() < 1e-8  # the reference gradients of the improbable rows are tiny but not zero
    assert torch.allclose(w.grad[8:], rare, rtol=0.1, atol=0)  # kept, to fp16 forward-logit accuracy
    assert w.grad.dtype == torch.float32


# -- the offline wheelhouse leaves out the optional extras: a feature that needs one says which ------------------------


def test_a_missing_optional_package_fails_naming_the_feature_and_the_extra():
    with pytest.raises(ImportError, match=r"model.init_from needs the `no_such_pkg` package.*'gpt2x\[hf\]'"):
        import_extra("no_such_pkg", "hf", "model.init_from")
    assert import_extra("json", "hf", "anything").__name__ == "json"
