"""The modern recipe as config choices: techniques (conf/technique/), cumulative rungs and ablations (conf/recipe/)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers import CONF_DIR, compose, losses, run_train, yaml_options
from omegaconf import OmegaConf

from gpt2x.run.report import config_label
from gpt2x.validate import validate

TECHNIQUES = yaml_options("technique")


def sweep(experiment: str) -> list[str]:
    """The recipes an experiment's multirun sweeps, in order."""
    return OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").hydra.sweeper.params.recipe.split(",")


def techniques_of(recipe: str) -> list[str]:
    """The technique list a conf/recipe/<recipe>.yaml selects (none for the baseline)."""
    for entry in OmegaConf.load(CONF_DIR / "recipe" / f"{recipe}.yaml").get("defaults", []):
        if "/technique" in entry:
            return list(entry["/technique"])
    return []


def test_the_cumulative_rungs_add_one_technique_each_and_end_with_all_of_them():
    rungs = sweep("speedrun")
    assert rungs[0] == "baseline" and techniques_of("baseline") == []
    assert rungs[-1] == "full" and sorted(techniques_of("full")) == TECHNIQUES  # every technique is in the recipe
    for before, after in itertools.pairwise(rungs):
        added = techniques_of(after)
        assert added[:-1] == techniques_of(before), (before, after)  # earlier ones kept, in order
        assert after == "full" or added[-1] == after  # a rung is named by what it adds


def test_the_ablation_runs_each_technique_alone_and_the_full_recipe_without_each():
    full = techniques_of("full")
    runs = sweep("speedrun_ablate")
    assert {"baseline", "full"} <= set(runs) and len(runs) == len(set(runs)) == 2 + 2 * len(full)
    for t in full:
        assert techniques_of(f"only_{t}") == [t]
        assert techniques_of(f"no_{t}") == [x for x in full if x != t]
    # every recipe file is swept by one of the two experiments, so none is left untested
    assert set(yaml_options("recipe")) == set(runs) | set(sweep("speedrun"))


def test_the_gpu_forms_sweep_the_same_recipes_at_gpt2_size():
    assert sweep("speedrun_gpu") == sweep("speedrun")
    assert sweep("speedrun_ablate_gpu") == sweep("speedrun_ablate")
    cfg = compose(["+experiment=speedrun_ablate_gpu", "recipe=full"])
    assert (cfg.model.name, cfg.data.name, cfg.target_val_loss) == ("gpt2", "fineweb_edu", 3.28)
    # sizes that scale with the model: windows of seq_len/2 and /4, n_layer/4 value-embedding tables
    assert (cfg.model.window, cfg.model.short_window, cfg.model.value_embeds) == (512, 256, 3)
    # CUDA's flash kernel takes no window: every GPU rung runs flex, so the window rung changes the mask alone
    assert cfg.attention.name == compose(["+experiment=speedrun_gpu", "recipe=baseline"]).attention.name == "flex"


def test_the_speedrun_baseline_rung_is_the_speedrun_baseline_run():
    """recipe=baseline changes nothing but labels: its time to target is the baseline's."""
    a = OmegaConf.to_container(compose(["+experiment=speedrun", "recipe=baseline"]), resolve=True)
    b = OmegaConf.to_container(compose(["+experiment=speedrun_baseline"]), resolve=True)
    labels = {"experiment", "rung", "report_baseline"}
    assert {k: v for k, v in a.items() if k not in labels} == {k: v for k, v in b.items() if k not in labels}
    assert (a["rung"], a["report_baseline"]) == ("baseline", "baseline")


@pytest.mark.parametrize("recipe", sorted(set(sweep("speedrun")) | set(sweep("speedrun_ablate"))))
def test_every_recipe_composes_and_passes_validation_on_a_cpu(recipe):
    cfg = compose(["+experiment=speedrun_ablate", f"recipe={recipe}"])
    assert cfg.rung == recipe and cfg.target_val_loss == 5.85 and cfg.optim.max_steps == 800
    validate(cfg, torch.device("cpu"), 1)


def test_the_full_recipe_on_the_cpu_model_sets_every_technique():
    cfg = compose(["+experiment=speedrun", "recipe=full"])
    m = cfg.model
    assert (m.position, m.norm, m.norm_gain, m.qk_norm, m.activation) == ("rope", "rmsnorm", False, True, "relu2")
    assert (m.tie_embeddings, m.logit_softcap, m.init) == (False, 15.0, "zero_proj")
    assert (m.window, m.short_window, m.window_pattern, m.value_embeds) == (64, 32, "SSSL", 1)
    assert (cfg.optim.name, cfg.optim.schedule) == ("muon", "trapezoid")
    # the rest of the run is the baseline's: same data, model size, target, horizon
    base = compose(["+experiment=speedrun", "recipe=baseline"])
    assert (m.n_layer, m.n_embd, cfg.data, cfg.optim.max_steps) == (4, 128, base.data, base.optim.max_steps)


def test_the_full_recipe_trains_a_tiny_model(tmp_path):
    """Every technique at once, through the real loop: Muon + AdamW under the trapezoid, all model choices."""
    summary = run_train(tmp_path, ["recipe=full", "model.n_layer=4", "optim.max_steps=8", "optim.warmup_steps=1"])
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["config"]["model"]["value_embeds"] == 1 and record["config"]["optim"]["name"] == "muon"
    trained = losses(tmp_path)
    assert len(trained) == 8 and all(math.isfinite(x) for x in trained)
    assert max(trained[-3:]) < trained[0] - 0.1, trained  # it learns, not just runs
    assert summary["final_val_loss"] < trained[0]


def test_a_recipe_run_is_labelled_by_its_rung_alone_in_reports():
    """recipe=X sets rung X: `muon`, not `muon recipe=muon`, so report_baseline=baseline names the baseline recipe."""
    assert config_label("muon", ["recipe=muon", "seed=2"]) == ("muon", "seed=2")
    assert config_label("muon", ["recipe=muon", "optim.lr=1e-3"]) == ("muon optim.lr=1e-3", "")
    assert config_label(None, ["recipe=muon"]) == ("recipe=muon", "")  # no rung recorded: the override is the name
