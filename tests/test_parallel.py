"""Data parallelism on CPU with gloo: real worker processes, real DDP/FSDP2, real torchrun and Hydra multirun.

Parity tests follow torchtitan's idea: a parallel layout must reproduce the single-process loss trajectory. Two ranks
with k micro-steps each see exactly the windows one process sees with 2k micro-steps (the loader interleaves ranks
window by window), so in fp32 the per-step losses agree to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, cli_env, compose, losses, train_cli

from gpt2x.launch import WorkerFailedError, launch
from gpt2x.run.record import read_run_summary
from gpt2x.speed import parallel

B, T, K = 2, 32, 2  # micro-batch, sequence length, micro-steps per rank in the 2-process runs
TOTAL = 2 * K * B * T  # tokens per optimizer step: 2 ranks x K micro-steps = 1 rank x 2K micro-steps
PARITY = [f"data.total_batch_size={TOTAL}", "precision=fp32"]  # TINY runs 3 steps


def launch_run(run_dir: Path, overrides: list[str]) -> dict:
    """Train through `parallel.launch`, as gpt2x-train does: workers for ddp/fsdp, this process for single."""
    from gpt2x.train import train

    cfg = compose(TINY + overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    return launch(train, cfg, run_dir)


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference: one process, 2K micro-steps per optimizer step."""
    run_dir = tmp_path_factory.mktemp("single")
    summary = launch_run(run_dir, PARITY + ["parallel=single"])
    assert summary["world_size"] == 1 and summary["grad_accum_steps"] == 2 * K
    return run_dir


@pytest.mark.slow
def test_ddp_two_procs_equals_single_proc_with_double_accumulation(single_run, tmp_path):
    summary = launch_run(tmp_path, PARITY + ["parallel=ddp", "parallel.nproc_per_node=2"])
    assert summary["world_size"] == 2 and summary["grad_accum_steps"] == K
    assert summary["tokens_per_step"] == TOTAL
    ref, got = losses(single_run), losses(tmp_path)
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, abs=1e-5), f"ddp {got} vs single {ref}"
    assert ref[-1] < ref[0]  # it trained, so matching steps 1 and 2 compares updated weights too


@pytest.mark.slow
def test_fsdp_two_procs_equals_single_proc_and_checkpoints_full_weights(single_run, tmp_path):
    run = tmp_path / "run"
    summary = launch_run(run, PARITY + ["parallel=fsdp", "parallel.nproc_per_node=2", "checkpoint_interval=1"])
    assert summary["world_size"] == 2 and summary["grad_accum_steps"] == K
    ref, got = losses(single_run), losses(run)
    assert got == pytest.approx(ref, abs=1e-5), f"fsdp {got} vs single {ref}"

    # Rank 0 wrote checkpoints of whole tensors, gathered from the shards: one loads into a plain model.
    from gpt2x.run import checkpoint
    from gpt2x.train import build_model

    step1 = checkpoint.checkpoint_path(run / "checkpoints", 1)
    state = checkpoint.load(step1)
    assert all(not hasattr(v, "placements") for v in state["model"].values())  # no DTensor shards
    build_model(compose(TINY)).load_state_dict(state["model"])
    assert state["optimizer"]["state"], "optimizer moments were gathered too"

    # Resuming FSDP from it re-shards weights and optimizer state and repeats the last step exactly.
    resumed = tmp_path / "resumed"
    launch_run(resumed, PARITY + ["parallel=fsdp", "parallel.nproc_per_node=2", f"resume={step1}"])
    assert losses(resumed) == pytest.approx(got[2:], abs=1e-6)


def train_with_an_out_of_vocabulary_token_on_rank_1(cfg, run_dir):
    """train(), except that rank 1's loader hands out a token id past the vocabulary in its first batch.

    A test hook inside the worker: a shard holding such an id is refused by every rank when it is first opened (its
    checksum and vocabulary check), so corrupt data on disk can no longer make one rank fail alone.
    """
    from gpt2x.data.shards import ShardLoader
    from gpt2x.train import train

    if os.environ.get("RANK") == "1":
        next_batch = ShardLoader.next_batch

        def next_batch_with_a_bad_token(self):
            x, y = next_batch(self)
            x[0, 10] = 60000  # e.g. a token of a larger tokenizer; model.vocab_size is 50257
            return x, y

        ShardLoader.next_batch = next_batch_with_a_bad_token
    return train(cfg, run_dir)


@pytest.mark.slow
def test_worker_that_fails_fails_the_run_with_its_rank_and_error(tmp_path):
    """A token id past the vocabulary in a batch only rank 1 reads: rank 1 dies in its forward pass while rank 0
    waits in the gradient all-reduce. The run must stop (not hang) and name rank 1 and its error."""
    cfg = compose(TINY + ["parallel=ddp", "parallel.nproc_per_node=2"])
    (tmp_path / "run").mkdir()

    t0 = time.time()
    with pytest.raises(WorkerFailedError) as err:
        launch(train_with_an_out_of_vocabulary_token_on_rank_1, cfg, tmp_path / "run")
    message = str(err.value)
    assert "parallel=ddp: rank 1 of 2 failed" in message
    assert "IndexError" in message and "index out of range" in message
    assert "rank 1 traceback:" in message and "gpt.py" in message  # where it broke, not just that it broke
    assert time.time() - t0 < 120  # rank 0 was stopped, not left waiting for the all-reduce timeout


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_share_rank0_run_dir(tmp_path):
    """Two torchrun agents rendezvous over c10d as two "nodes" of one worker each. Each node's Hydra app gets its own
    run dir, as `${now:...}` dirs do when nodes start in different seconds; the run completes in rank 0's dir and the
    other rank removes the dir Hydra made for it."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=gpt2x-test", "--max-restarts=0",
        "-m", "gpt2x.train", *TINY, "parallel=ddp",
    ]  # fmt: skip
    env = cli_env()

    def start_node(name: str) -> subprocess.Popen:
        node_cmd = [*cmd, f"hydra.run.dir=outputs/{name}"]
        with open(tmp_path / f"{name}.log", "w") as log:  # a file, not a pipe: a full pipe would block the node
            return subprocess.Popen(node_cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    agents = [start_node("node_a"), start_node("node_b")]
    try:
        for agent in agents:
            agent.wait(timeout=240)
    finally:
        for agent in agents:
            agent.kill()
    for agent, name in zip(agents, ("node_a", "node_b"), strict=True):
        assert agent.returncode == 0, (tmp_path / f"{name}.log").read_text()[-4000:]

    run_dirs = sorted((tmp_path / "outputs").iterdir())
    assert len(run_dirs) == 1, f"expected rank 0's run dir only, found {run_dirs}"
    run_dir = run_dirs[0]
    record = json.loads((run_dir / "record.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert record["world_size"] == 2 and summary["steps"] == 3
    assert len(losses(run_dir)) == 3


@pytest.mark.slow
def test_hydra_multirun_holds_a_ddp_rung_beside_a_single_one(tmp_path):
    """`gpt2x-train -m parallel=single,ddp`: the ddp job starts its own workers inside the sweep (the ladder's use)."""
    # Each option brings its own process count: parallel/single.yaml 1, parallel/ddp.yaml 2.
    train_cli(["-m", *TINY, "parallel=single,ddp", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    summaries = [read_run_summary(tmp_path / "sweep" / str(i)) for i in (0, 1)]  # results beside the run's facts
    assert [s["config"]["parallel"] for s in summaries] == ["single", "ddp"]
    assert [s["world_size"] for s in summaries] == [1, 2]
    assert all(s["tokens_per_sec"] > 0 for s in summaries)
    # Rank 0 alone wrote the ddp job's files, into the job's own sweep subdir.
    assert len(losses(tmp_path / "sweep" / "1")) == 3


@pytest.mark.slow
def test_submitit_tasks_become_the_ranks_of_one_run(tmp_path):
    """The SLURM path without a cluster: hydra/launcher=slurm runs each SLURM task through submitit, and so does
    submitit_local here; two tasks of one job must become ranks 0 and 1 of one DDP run in the job's one dir."""
    submitit = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5"]
    train_cli(["-m", *TINY, "parallel=ddp", "hydra.sweep.dir=sweep", *submitit], cwd=tmp_path)
    record = json.loads((tmp_path / "sweep" / "0" / "record.json").read_text())
    assert record["world_size"] == 2 and record["grad_accum_steps"] == 1
    assert len(losses(tmp_path / "sweep" / "0")) == 3


def _killed_on_rank_1(cfg, run_dir):
    # Rank 1 dies as under the OOM killer: no Python error, no chance to clean up; rank 0 waits for it to join.
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()


@pytest.mark.slow
def test_worker_killed_by_a_signal_fails_the_run_naming_the_signal(tmp_path):
    cfg = compose(["parallel=ddp", "parallel.nproc_per_node=2"])
    t0 = time.time()
    with pytest.raises(WorkerFailedError, match=r"rank 1 of 2 failed .*Signal 9 \(SIGKILL\)"):
        launch(_killed_on_rank_1, cfg, tmp_path)
    assert time.time() - t0 < 120


def test_slurm_launcher_config_composes_with_one_task_per_gpu():
    cfg = compose(["hydra/launcher=slurm", "parallel=ddp"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node


@pytest.mark.parametrize(
    "overrides, world_size, device, match",
    [
        (["parallel=fsdp"], 1, "cpu", "parallel=fsdp needs at least 2 processes"),
        (["parallel=single", "parallel.nproc_per_node=2"], 1, "cpu", "parallel=single runs one process"),
        (["parallel=ddp", "parallel.backend=nccl"], 2, "cpu", "parallel.backend=nccl needs CUDA"),
        (["parallel=fsdp", "precision=fp16"], 2, "cpu", "parallel=fsdp with precision=fp16"),
    ],
)
def test_parallel_settings_that_cannot_work_fail_before_training(overrides, world_size, device, match):
    cfg = compose(overrides)
    with pytest.raises(ValueError, match=match):
        parallel.check_parallel(cfg.parallel, cfg.precision, torch.device(device), world_size)


def test_ddp_outside_a_launcher_says_how_to_start_workers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="start it with gpt2x-train"):
        parallel.init_distributed(compose(["parallel=ddp"]).parallel, torch.device("cpu"))


@pytest.mark.slow
def test_fsdp_with_compile_compiles_each_block_without_graph_breaks(tmp_path):
    """FSDP2 needs the blocks compiled before they are sharded: a whole-model compile made first graph-breaks in
    FSDP's hooks and runs mostly eager. Dynamo's own log must show the block's forward and the loss compiled on each
    rank, once, and no graph break anywhere."""
    import inspect

    from gpt2x.model.gpt import Block
    from gpt2x.model.loss import plain_loss

    args = [*TINY, "peak_flops=1e12", "optim.max_steps=2", "eval_interval=0", "sample_interval=0", "parallel=fsdp",
            "parallel.nproc_per_node=2", "compile=default", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    os.environ["TORCH_LOGS"] = "graph_breaks,dynamo"  # read by the subprocess's environment (cli_env copies it)
    try:
        proc = train_cli(args, timeout=600)
    finally:
        del os.environ["TORCH_LOGS"]
    log = proc.stdout + proc.stderr
    assert "graph break" not in log.lower(), [line for line in log.splitlines() if "graph break" in line.lower()]
    traced = [line.split("start tracing ", 1)[1] for line in log.splitlines() if "start tracing " in line]
    block_forward = f"forward {inspect.getsourcefile(Block)}:{inspect.getsourcelines(Block.forward)[1]}"
    loss = f"plain_loss {inspect.getsourcefile(plain_loss)}:{inspect.getsourcelines(plain_loss)[1]}"
    # each rank compiles one Block graph (reused by every block) and the output layer with its loss, nothing else
    assert sorted(traced) == sorted([block_forward, loss] * 2), traced
