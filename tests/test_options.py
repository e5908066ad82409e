"""Every option a user can pick (conf/<group>/*.yaml) composes and has code behind it; every code table entry has one.

Parametrized by the YAML files found at collection time, crossed with the code tables both ways: an option file
without code, or code without an option file, fails here rather than at the start of someone's run.
"""

from __future__ import annotations

import functools

import pytest
from helpers import CONF_DIR, compose, yaml_options

from gpt2x.config import GROUPS
from gpt2x.data import DATASETS
from gpt2x.model.attention import ATTENTION_KERNELS
from gpt2x.model.loss import LOSSES
from gpt2x.optim import OPTIMIZERS, SCHEDULES
from gpt2x.run.profile import PROFILERS
from gpt2x.speed.checkpointing import ACTIVATION_CHECKPOINTS
from gpt2x.speed.compile import COMPILE_MODES, check_compile
from gpt2x.speed.parallel import PARALLEL_STRATEGIES
from gpt2x.speed.precision import AUTOCAST_DTYPES, MATMUL_PRECISIONS

# Config groups whose option name is the key of a name -> code table.
TABLES = {
    "attention": ATTENTION_KERNELS,
    "loss": LOSSES,
    "activation_checkpoint": ACTIVATION_CHECKPOINTS,
    "parallel": PARALLEL_STRATEGIES,
    "data": DATASETS,
    "optim": OPTIMIZERS,
    "profile": PROFILERS,
}
# Overrides an option needs to compose at all (a mandatory `???` field).
REQUIRED = {("data", "text"): ["data.path=/tmp"]}
# torch.compile modes reachable only as `compile=default compile.mode=<mode>`, without an option file of their own.
COMPILE_MODES_WITHOUT_OPTION = {"reduce-overhead"}

ALL_OPTION_FILES = [(group, name) for group in GROUPS for name in yaml_options(group)]
OPTION_FILES = [(group, name) for group in TABLES for name in yaml_options(group)]
TABLE_ENTRIES = [(group, name) for group, table in TABLES.items() for name in table]


@functools.cache  # each option composes once; the tests only read it
def option(group: str, name: str):
    """The composed config node of `group=name`."""
    return compose([f"{group}={name}", *REQUIRED.get((group, name), [])])[group]


def ids(pairs):
    return [f"{group}={name}" for group, name in pairs]


@pytest.mark.parametrize("group,name", ALL_OPTION_FILES, ids=ids(ALL_OPTION_FILES))
def test_every_option_of_every_group_composes_and_is_named_after_its_file(group, name):
    assert option(group, name).name == name


@pytest.mark.parametrize("group,name", OPTION_FILES, ids=ids(OPTION_FILES))
def test_every_option_file_of_a_table_group_has_an_entry_in_the_code_table(group, name):
    assert option(group, name).name == name
    assert name in TABLES[group], f"conf/{group}/{name}.yaml has no entry in the code's table: {sorted(TABLES[group])}"


@pytest.mark.parametrize("group,name", TABLE_ENTRIES, ids=ids(TABLE_ENTRIES))
def test_every_code_table_entry_has_an_option_file(group, name):
    assert (CONF_DIR / group / f"{name}.yaml").is_file(), f"{group} {name!r} is in the code but not in conf/{group}/"


@pytest.mark.parametrize("name", yaml_options("precision"))
def test_every_precision_option_uses_an_autocast_dtype_and_matmul_precision_the_code_knows(name):
    precision = option("precision", name)
    assert precision.name == name
    assert precision.autocast_dtype is None or precision.autocast_dtype in AUTOCAST_DTYPES
    assert precision.matmul_precision in MATMUL_PRECISIONS


@pytest.mark.parametrize("dtype", sorted(AUTOCAST_DTYPES))
def test_every_autocast_dtype_has_a_precision_option(dtype):
    used = {option("precision", name).autocast_dtype for name in yaml_options("precision")}
    assert dtype in used, f"no conf/precision/*.yaml selects autocast_dtype={dtype}"


@pytest.mark.parametrize("name", yaml_options("compile"))
def test_every_compile_option_is_eager_or_a_torch_compile_mode_the_code_accepts(name):
    compile_cfg = option("compile", name)
    assert compile_cfg.name == name
    check_compile(compile_cfg)  # raises for a mode torch.compile does not know
    assert name == "none" or compile_cfg.mode in COMPILE_MODES


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_compile_mode_has_an_option_file_or_is_listed_as_override_only(mode):
    with_file = {option("compile", name).mode for name in yaml_options("compile") if name != "none"}
    assert (mode in with_file) != (mode in COMPILE_MODES_WITHOUT_OPTION), (
        f"compile mode {mode!r}: give it a conf/compile/{mode}.yaml or list it in COMPILE_MODES_WITHOUT_OPTION "
        "(exactly one of the two)"
    )


@pytest.mark.parametrize("name", yaml_options("optim"))
def test_every_optim_option_uses_a_schedule_the_code_knows(name):
    assert option("optim", name).schedule in SCHEDULES
