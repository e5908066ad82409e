"""The composed config: defaults, overrides, typos and wrong types fail at compose time (each option: test_options)."""

from __future__ import annotations

import pytest
from helpers import compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from gpt2x.config import OptimConfig
from gpt2x.optim.adamw import lr_at


def test_default_run_is_a_small_model_on_the_embedded_shakespeare_in_fp32():
    cfg = compose()
    chosen = (cfg.model.name, cfg.data.name, cfg.precision.name, cfg.attention.name)
    assert chosen == ("small", "shakespeare", "fp32", "sdpa")
    assert (cfg.compile.name, cfg.parallel.name, cfg.logger.name) == ("none", "single", "none")


def test_command_line_overrides_reach_the_config():
    cfg = compose(["model=tiny", "optim.max_steps=50", "data.batch_size=4"])
    assert (cfg.model.n_layer, cfg.optim.max_steps, cfg.data.batch_size) == (2, 50, 4)


def test_a_typo_in_a_key_fails_at_compose_time_naming_the_schema():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["optim.lrr=1e-3"])
    assert "Key 'lrr' not in 'OptimConfig'" in str(e.value.__cause__)


def test_a_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["optim.max_steps=many"])
    assert isinstance(e.value.__cause__, ValidationError)


def test_an_unknown_model_name_fails_listing_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model=gpt5"])
    assert "gpt5" in str(e.value) and "gpt2-medium" in str(e.value)


def test_run_and_multirun_dirs_live_under_outputs():
    hydra = OmegaConf.to_container(compose(return_hydra_config=True).hydra)  # unresolved: no job is running
    assert hydra["run"]["dir"] == "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    assert hydra["sweep"]["dir"] == "outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    assert hydra["sweep"]["subdir"] == "${hydra.job.num}"


def test_lr_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))
