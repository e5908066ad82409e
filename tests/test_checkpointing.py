"""Activation checkpointing is a config choice that changes memory and time only: the same loss, the same gradients
and the same state-dict keys as without it, alone, compiled and under FSDP."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import compose, losses, run_train
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpt2x.config import ActivationCheckpointConfig, ModelConfig
from gpt2x.model.gpt import GPT
from gpt2x.speed.checkpointing import _checkpointed_forward, apply_activation_checkpointing, check_activation_checkpoint
from gpt2x.validate import validate

CHECKPOINTED = ["full", "selective"]


# every model choice of the speedrun recipe at once: rotary, RMSNorm, QK-norm, ReLU², untied, softcap, zero-init,
# long/short windows and value embeddings (whose tables reach the blocks as an extra argument)
MODERN = dict(position="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
              logit_softcap=15.0, init="zero_proj", window=8, short_window=4, window_pattern="SL", value_embeds=1)


def _model_and_batch(**choices):
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, **choices)
    model = GPT(config, real_vocab_size=50257)
    idx, targets = torch.randint(0, 50257, (2, 2, 16)).unbind(0)
    return model, idx, targets


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, return_logits=False)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _kept_bytes(model, idx, targets) -> int:
    """Bytes of the tensors one training forward makes that are still alive after it: what its backward will read.

    Counted by storage (the checkpoint's own saved-tensor hooks hide its tensors from torch.autograd.graph's).
    """
    made = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    made[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return out

    with Record():
        _, loss = model(idx, targets, return_logits=False)  # the loss holds the graph, and the graph what it saved
    kept = sum(n for ref, n in made.values() if not ref.expired())
    del loss
    return kept


@pytest.mark.parametrize("choices", [{}, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpointed_model_has_the_loss_gradients_and_keys_of_the_plain_one(name, choices):
    model, idx, targets = _model_and_batch(**choices)
    plain = copy.deepcopy(model)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(name=name))
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and the HF export rely on these keys
    loss, grads = _loss_and_grads(model, idx, targets)
    ref_loss, ref_grads = _loss_and_grads(plain, idx, targets)
    assert torch.equal(loss, ref_loss)
    for key, grad in ref_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-7, msg=key)  # recomputation may reorder


def test_checkpointing_keeps_fewer_activations_full_fewest():
    model, idx, targets = _model_and_batch()
    saved = {}
    for name in ["none", *CHECKPOINTED]:
        m = copy.deepcopy(model)
        apply_activation_checkpointing(m, ActivationCheckpointConfig(name=name))
        saved[name] = _kept_bytes(m, idx, targets)
    assert saved["full"] < saved["selective"] < saved["none"], saved


def test_deepcopy_of_a_checkpointed_model_runs_its_own_blocks():
    model, idx, targets = _model_and_batch()
    apply_activation_checkpointing(model, ActivationCheckpointConfig(name="full"))
    clone = copy.deepcopy(model)
    assert clone.transformer.h[0].forward.__self__ is clone.transformer.h[0]
    with torch.no_grad():
        clone.transformer.h[0].mlp.c_proj.weight.zero_()
    assert not torch.equal(clone(idx, targets)[1], model(idx, targets)[1])


def test_unknown_activation_checkpoint_fails_before_training_listing_the_choices():
    with pytest.raises(ValueError, match=r"activation_checkpoint='every' is unknown; valid: none, full, selective"):
        check_activation_checkpoint(ActivationCheckpointConfig(name="every"))
    cfg = compose(["activation_checkpoint=full"])
    validate(cfg, torch.device("cpu"), 1)  # a known choice passes


def test_parallelize_checkpoints_the_blocks_before_anything_else():
    from gpt2x.speed.parallel import parallelize

    model, idx, targets = _model_and_batch()
    ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(model), idx, targets)
    trained = parallelize(model, compose(["activation_checkpoint=full"]), torch.device("cpu"))
    assert all(block.forward.__func__ is _checkpointed_forward for block in model.transformer.h)
    loss, grads = _loss_and_grads(trained, idx, targets)
    assert torch.equal(loss, ref_loss)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # one cold inductor compile
def test_checkpointed_blocks_compile_and_train_like_eager(tmp_path):
    eager = run_train(tmp_path / "eager", ["optim.max_steps=2", "activation_checkpoint=selective"])
    compiled = run_train(tmp_path / "compiled", ["optim.max_steps=2", "activation_checkpoint=selective",
                                                 "compile=default"])  # fmt: skip
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-3)  # inductor reorders fp32 sums


@pytest.mark.slow  # two gloo processes
def test_fsdp_two_procs_with_full_checkpointing_equals_without(tmp_path):
    from test_parallel import PARITY, launch_run

    plain = launch_run(tmp_path / "plain", PARITY + ["parallel=fsdp", "parallel.nproc_per_node=2"])
    full = launch_run(tmp_path / "full", PARITY + ["parallel=fsdp", "parallel.nproc_per_node=2",
                                                   "activation_checkpoint=full"])  # fmt: skip
    assert plain["world_size"] == full["world_size"] == 2
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
