"""Optimizers and schedules: which optimizer updates which parameter, the schedules' values, per-group lrs in a real
run, the Muon + AdamW pair under GradScaler and checkpoints, and the settings validate refuses."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, losses, read_metrics, run_train, tiny_corpus
from omegaconf import OmegaConf
from torch import nn

from gpt2x.config import ModelConfig, OptimConfig
from gpt2x.model.gpt import GPT
from gpt2x.optim import CombinedOptimizer, build_optimizer, lr_at, lr_scale
from gpt2x.run import checkpoint
from gpt2x.run.checkpoint import changed_settings, load_full_state_dicts
from gpt2x.validate import validate


def tiny_model(seed: int = 0) -> GPT:
    """A 2-layer GPT with a 128-token vocabulary: the real module names, in milliseconds."""
    torch.manual_seed(seed)
    config = ModelConfig(name="t", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128)
    return GPT(config, real_vocab_size=128)


def names_by_optimizer(model: nn.Module, optimizer: CombinedOptimizer) -> dict[str, list[str]]:
    """The parameter names each of the pair's optimizers holds (a tensor under several names: all of them)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {
        which: sorted(n for group in opt.param_groups for p in group["params"] for n in names[id(p)])
        for which, opt in optimizer.optimizers.items()
    }


# -- which parameters Muon updates ----------------------------------------------------------------------------------


def test_muon_updates_exactly_the_hidden_matrices_and_adamw_the_rest_with_the_tied_head_once():
    model = tiny_model()
    optimizer = build_optimizer(model, compose(["optim=muon"]).optim, "cpu")
    held = names_by_optimizer(model, optimizer)
    n_layer = len(model.transformer.h)
    hidden = [f"transformer.h.{i}.{m}.weight" for i in range(n_layer)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    assert held["muon"] == sorted(hidden)
    # the tied lm_head is wte: one tensor, updated once, by AdamW (both names point at it)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.wpe.weight"} <= set(held["adamw"])
    assert "transformer.h.0.attn.c_attn.bias" in held["adamw"] and "transformer.ln_f.weight" in held["adamw"]
    every = [id(p) for opt in optimizer.optimizers.values() for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert all(p.ndim == 2 for p in optimizer.optimizers["muon"].param_groups[0]["params"])


def test_muon_gives_each_adamw_role_its_own_peak_lr_and_an_untied_head_and_value_embeddings_their_groups():
    model = tiny_model()
    C = model.config.n_embd
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    model.transformer.ve = nn.ModuleList([nn.Embedding(model.config.vocab_size, C)])  # a value-embedding table
    overrides = ["optim=muon", "optim.lr=1e-3", "optim.muon_lr=0.03", "optim.embed_lr=0.1", "optim.head_lr=0.004",
                 "optim.scalar_lr=0.002", "optim.weight_decay=0.1", "optim.muon_weight_decay=0.01"]  # fmt: skip
    optimizer = build_optimizer(model, compose(overrides).optim, "cpu")
    groups = {g["role"]: g for g in optimizer.param_groups}
    assert sorted(groups) == ["embed", "head", "hidden", "scalar"]
    lrs = {role: (g["base_lr"], g["weight_decay"]) for role, g in groups.items()}
    assert lrs == {"hidden": (0.03, 0.01), "embed": (0.1, 0.1), "head": (0.004, 0.1), "scalar": (0.002, 0.0)}
    embeds = {id(p) for p in groups["embed"]["params"]}
    assert embeds == {id(model.transformer.wte.weight), id(model.transformer.wpe.weight),
                      id(model.transformer.ve[0].weight)}  # fmt: skip
    assert [id(p) for p in groups["head"]["params"]] == [id(model.lm_head.weight)]


def test_adamw_keeps_its_two_weight_decay_groups_at_optim_lr():
    optimizer = build_optimizer(tiny_model(), compose(["optim.lr=1e-3"]).optim, "cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["weight_decay"], g["base_lr"], g["lr"]) for g in optimizer.param_groups] == [
        (0.1, 1e-3, 1e-3),
        (0.0, 1e-3, 1e-3),
    ]


# -- schedules --------------------------------------------------------------------------------------------------------


def test_trapezoid_warms_up_stays_flat_then_falls_linearly_to_zero_over_the_cooldown():
    cfg = OptimConfig(lr=2.0, schedule="trapezoid", warmup_steps=10, max_steps=100, cooldown_fraction=0.4)
    scale = [lr_scale(s, cfg) for s in range(101)]
    assert scale[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warmup
    assert scale[10:60] == [1.0] * 50  # flat until the last 40 steps
    assert scale[60:] == pytest.approx([(100 - s) / 40 for s in range(60, 101)])  # 1 at step 60 ... 0 at max_steps
    assert scale[99] == pytest.approx(1 / 40) and scale[100] == 0.0
    assert lr_at(80, cfg) == pytest.approx(2.0 * 0.5)
    flat = OptimConfig(schedule="trapezoid", warmup_steps=0, max_steps=10, cooldown_fraction=0.0)
    assert [lr_scale(s, flat) for s in range(12)] == [1.0] * 12  # no cooldown: constant


def test_cosine_is_the_lectures_schedule_unchanged():
    cfg = OptimConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    for step in range(130):  # the formula lr_at had before schedules became factors
        if step < 10:
            want = 6e-4 * (step + 1) / 10
        elif step >= 110:
            want = 6e-5
        else:
            want = 6e-5 + 0.5 * (1 + math.cos(math.pi * (step - 10) / 100)) * (6e-4 - 6e-5)
        assert lr_at(step, cfg) == pytest.approx(want, rel=1e-12)
        assert lr_scale(step, cfg) == pytest.approx(want / 6e-4, rel=1e-12)


# -- in a real run ----------------------------------------------------------------------------------------------------

MUON_RUN = ["optim=muon", "optim.max_steps=6", "optim.warmup_steps=2", "optim.schedule=trapezoid",
            "optim.cooldown_fraction=0.5", "optim.embed_lr=3e-3", "eval_interval=0", "sample_interval=0",
            "checkpoint_interval=3", "keep_checkpoints=2", "precision=fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("muon")
    run_train(run_dir, MUON_RUN)
    return run_dir


def test_a_tiny_model_trains_with_muon_and_every_group_follows_the_schedule(muon_run):
    got = losses(muon_run)
    assert len(got) == 6 and got[-1] < got[0] - 0.2, got
    cfg = compose(TINY + MUON_RUN).optim
    assert [r["lr"] for r in read_metrics(muon_run)] == pytest.approx([lr_at(s, cfg) for s in range(6)])
    # the last step's lrs, as the checkpoint of step 5 holds them: each group's peak times the same factor
    state = checkpoint.load(checkpoint.checkpoint_path(muon_run / "checkpoints", 5))
    groups = [g for opt in ("muon", "adamw") for g in state["optimizer"][opt]["param_groups"]]
    peaks = {"hidden": 0.02, "embed": 3e-3, "scalar": 6e-4}
    assert {g["role"]: g["lr"] for g in groups} == pytest.approx({r: lr_scale(5, cfg) * p for r, p in peaks.items()})
    assert lr_scale(5, cfg) == pytest.approx(1 / 3)  # trapezoid: cooling down over steps 3-5 (3/3, 2/3, 1/3)


@pytest.mark.slow
def test_a_muon_run_resumed_from_a_checkpoint_logs_the_same_losses_as_the_run_that_never_stopped(muon_run, tmp_path):
    step2 = checkpoint.checkpoint_path(muon_run / "checkpoints", 2)
    shutil.copy(step2, tmp_path / step2.name)
    run_train(tmp_path, MUON_RUN + [f"resume={tmp_path / step2.name}"])
    assert losses(tmp_path) == losses(muon_run)[3:]  # exact: moments, momentum buffers, data and RNG all continue


# -- the Muon + AdamW pair as one optimizer ----------------------------------------------------------------------------


def loss_of(model: GPT, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model(idx, idx)[1]


def test_grad_scaler_unscales_and_steps_both_optimizers_of_the_pair_and_skips_both_on_an_inf():
    """Why optim=muon may run with precision=fp16: GradScaler needs only param_groups and step (fp32 tensors here)."""
    cfg = compose(["optim=muon"]).optim
    plain, scaled = tiny_model(), tiny_model()
    opt_plain, opt_scaled = build_optimizer(plain, cfg, "cpu"), build_optimizer(scaled, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss_of(plain).backward()
    opt_plain.step()
    scaler.scale(loss_of(scaled)).backward()
    scaler.unscale_(opt_scaled)
    scaler.step(opt_scaled)
    scaler.update()
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)

    before = [p.detach().clone() for p in scaled.parameters()]
    opt_scaled.zero_grad()
    scaler.scale(loss_of(scaled, 1)).backward()
    scaled.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")  # in a Muon parameter only
    scaler.step(opt_scaled)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters(), strict=True))  # both skipped
    assert scaler.get_scale() == 512.0


def test_the_pairs_state_round_trips_and_a_checkpoint_of_another_optimizer_is_refused_by_name():
    cfg = compose(["optim=muon"]).optim
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = build_optimizer(a, cfg, "cpu"), build_optimizer(b, cfg, "cpu")
    for model, opt in ((a, opt_a), (b, opt_b)):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    b.load_state_dict(a.state_dict())
    state = copy.deepcopy(opt_a.state_dict())  # as from a file: load_state_dict would share a's tensors otherwise
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # momentum buffers
    opt_b.load_state_dict(state)
    for model, opt in ((a, opt_a), (b, opt_b)):
        loss_of(model, 2).backward()
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    adamw_state = build_optimizer(tiny_model(), compose([]).optim, "cpu").state_dict()
    with pytest.raises(ValueError, match="written with another optim.name"):
        opt_b.load_state_dict(adamw_state)


def test_a_resume_takes_moments_from_the_checkpoint_and_lrs_from_this_runs_config():
    model = tiny_model()
    old = build_optimizer(model, compose(["optim=muon"]).optim, "cpu")
    loss_of(model).backward()
    old.step()
    saved = copy.deepcopy(old.state_dict())
    for opt_state in saved.values():  # as a checkpoint written before param groups carried base_lr
        for group in opt_state["param_groups"]:
            del group["base_lr"]
    new = build_optimizer(model, compose(["optim=muon", "optim.lr=1e-3", "optim.muon_lr=0.05"]).optim, "cpu")
    load_full_state_dicts(model, new, model.state_dict(), saved)
    assert [g["base_lr"] for g in new.param_groups] == [0.05, 1e-2, 1e-3]  # hidden, embed (muon.yaml), scalar
    buffer = old.optimizers["muon"].state[model.transformer.h[0].mlp.c_fc.weight]["momentum_buffer"]
    assert torch.equal(new.optimizers["muon"].state[model.transformer.h[0].mlp.c_fc.weight]["momentum_buffer"], buffer)


# -- settings validate refuses -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim=muon", "optim.muon_lr=0"], "optim.muon_lr=0.0 must be positive"),
        (
            ["optim=muon", "optim.muon_adjust_lr=sqrt"],
            "optim.muon_adjust_lr='sqrt' is unknown; valid: original, match_rms_adamw",
        ),
        (["optim.schedule=linear"], "optim.schedule='linear' is unknown; valid: cosine, trapezoid"),
        (["optim.schedule=trapezoid", "optim.cooldown_fraction=1.5"], "optim.cooldown_fraction=1.5 must lie in"),
        (
            ["optim.schedule=trapezoid", "optim.max_steps=10", "optim.warmup_steps=8"],
            "optim.warmup_steps=8 plus the cooldown",
        ),
        (["optim=muon", "optim.embed_lr=0"], "optim.embed_lr=0.0 must be positive, or null"),
        (["optim.lr=0"], "optim.lr=0.0 must be positive"),
    ],
)
def test_optimizer_settings_that_cannot_work_are_refused_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate(compose(overrides), torch.device("cpu"), 1)


# -- Muon under data parallelism (gloo, 2 worker processes) ------------------------------------------------------------

PARITY = ["optim=muon", "data.total_batch_size=256", "precision=fp32", "eval_interval=0", "sample_interval=0"]


def launch_muon(run_dir: Path, layout: list[str]) -> list[float]:
    """Train TINY + PARITY through `launch`, as gpt2x-train does; the per-step losses."""
    from gpt2x.launch import launch
    from gpt2x.train import train

    run_dir.mkdir(parents=True)
    launch(train, compose(TINY + ["data=text", f"data.path={tiny_corpus()}", *PARITY, *layout]), run_dir)
    return losses(run_dir)


@pytest.fixture(scope="module")
def muon_single(tmp_path_factory) -> list[float]:
    """The reference: one process, 2 x 2 micro-steps per step (2 ranks x 2 micro-steps see the same windows)."""
    ref = launch_muon(tmp_path_factory.mktemp("muon_single") / "run", ["parallel=single"])
    assert len(ref) == 3 and ref[-1] < ref[0]
    return ref


@pytest.mark.slow
def test_muon_under_ddp_two_procs_equals_one_proc_with_double_accumulation(muon_single, tmp_path):
    """DDP all-reduces the gradients before the step, so each rank's Muon orthogonalizes the same whole matrices."""
    got = launch_muon(tmp_path / "ddp", ["parallel=ddp", "parallel.nproc_per_node=2"])
    # 1e-4, not fp32's 1e-5: the all-reduce sums gradients in another order, and Muon's bf16 Newton-Schulz can round
    # such a last-bit difference to the next bf16 value (seen: 4e-5 at step 2 with embed_lr 1e-2)
    assert got == pytest.approx(muon_single, abs=1e-4), f"ddp {got} vs single {muon_single}"


@pytest.mark.slow
def test_muon_under_fsdp_matches_one_proc_and_resumes_from_its_checkpoint(muon_single, tmp_path):
    """FSDP hands Muon row shards (DTensors); its Newton-Schulz matmuls on them gather what they need, so each step
    is the whole-matrix one up to bf16 rounding in another order (Muon orthogonalizes in bf16)."""
    fsdp = ["parallel=fsdp", "parallel.nproc_per_node=2"]
    got = launch_muon(tmp_path / "fsdp", [*fsdp, "checkpoint_interval=1"])
    assert got == pytest.approx(muon_single, abs=1e-3), f"fsdp {got} vs single {muon_single}"
    step1 = checkpoint.checkpoint_path(tmp_path / "fsdp" / "checkpoints", 1)
    state = checkpoint.load(step1)
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # Muon's, gathered with AdamW's
    assert launch_muon(tmp_path / "resumed", [*fsdp, f"resume={step1}"]) == pytest.approx(got[2:], abs=1e-6)


def _muon_step_on_row_shards(rank: int, port: int, out: dict) -> None:
    """Rank `rank` of 2: one Muon step on a 96x32 matrix, whole, as FSDP's row-sharded DTensor, and on its own rows."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    weight, grad = torch.randn(96, 32), torch.randn(96, 32)
    mesh = DeviceMesh("cpu", [0, 1])
    rows = slice(48 * rank, 48 * (rank + 1))
    whole = nn.Parameter(weight.clone())
    shards = nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
    own_rows = nn.Parameter(weight[rows].clone())
    for p, g in ((whole, grad), (shards, distribute_tensor(grad, mesh, [Shard(0)])), (own_rows, grad[rows])):
        p.grad = g.clone()
        torch.optim.Muon([p], lr=0.02, weight_decay=0.0).step()
    sharded = shards.full_tensor()
    if rank == 0:
        update = (whole - weight).abs().max()
        out["sharded"] = ((sharded - whole).abs().max() / update).item()
        out["own_rows"] = ((own_rows - whole[rows]).abs().max() / update).item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_muon_on_fsdp_row_shards_orthogonalizes_the_whole_matrix_not_each_shard():
    """What makes optim=muon parallel=fsdp correct: torch.optim.Muon on a row-sharded DTensor gives the whole
    matrix's update up to bf16 rounding (a few %), unlike orthogonalizing each rank's rows alone (~40% off)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_muon_step_on_row_shards, args=(port, out), nprocs=2)
        sharded, own_rows = out["sharded"], out["own_rows"]
    assert sharded < 0.1 and own_rows > 0.2, (sharded, own_rows)


def test_a_checkpoint_written_before_the_schedule_and_muon_settings_existed_resumes_at_their_defaults():
    saved = OmegaConf.to_container(compose([]), resolve=True)
    for key in ("schedule", "cooldown_fraction", "muon_lr", "embed_lr"):
        del saved["optim"][key]
    current = OmegaConf.to_container(compose([]), resolve=True)
    assert changed_settings(saved, current) == {}
    trapezoid = OmegaConf.to_container(compose(["optim.schedule=trapezoid"]), resolve=True)
    assert changed_settings(saved, trapezoid) == {"optim.schedule": ("<absent>", "trapezoid")}
