"""The package as a user installs it: a wheel that carries its configs, a `--help` that lists real choices."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from helpers import REPO


@pytest.mark.slow
def test_help_says_what_gpt2x_is_and_lists_only_real_choices():
    proc = subprocess.run([sys.executable, "-m", "gpt2x.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("gpt2x-train: train GPT-2 in PyTorch")
    assert "powered by Hydra" not in out and "base_" not in out and "schema" not in out
    choices = dict(line.split(": ", 1) for line in out.split("== Config groups (group=choice) ==")[1].split("==")[0]
                   .strip().splitlines())  # fmt: skip
    for group in ("model", "data", "precision", "attention", "loss", "compile", "parallel", "logger", "profile", "rung",
                  "optim"):
        files = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert choices[group].split(", ") == files, group
    assert "resume_allow" in out and "gpt2x-train -sc install=bash" in out


@pytest.mark.slow
def test_a_wheel_carries_its_configs_and_trains_from_a_fresh_venv(tmp_path):
    # built from a copy of the sources, so the build leaves nothing (build/, egg-info) in the checkout
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                                "wandb", "__pycache__", ".*_cache"))  # fmt: skip
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("gpt2x-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpt2x/conf/config.yaml" in names and "gpt2x/conf/model/tiny.yaml" in names
    assert "gpt2x/conf/hydra/launcher/slurm.yaml" in names

    # A fresh venv holding only the wheel; its dependencies come from this environment (no network here), while
    # neither this checkout nor its editable install is importable there.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE")}
    where = subprocess.run([venv / "bin" / "python", "-c", "import gpt2x; print(gpt2x.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(venv) in where and str(REPO) not in where

    cfg = subprocess.run([venv / "bin" / "gpt2x-train", "--cfg", "job", "model=tiny"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cfg.returncode == 0 and "name: tiny" in cfg.stdout, cfg.stderr
    train = [venv / "bin" / "gpt2x-train", "model=tiny", "optim.max_steps=2", "data.batch_size=2", "data.seq_len=32",
             "sample_max_tokens=4", "peak_flops=1e12", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    run = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def _package_imports() -> dict[str, set[str]]:
    """Module -> the gpt2x modules it imports (anywhere in the file, lazy imports included)."""
    import ast

    modules = {}
    for path in (REPO / "gpt2x").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt2x"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("gpt2x")]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_the_package_imports_form_no_circle():
    graph = _package_imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):  # a package importing its own submodules (re-exports) is not a circle
                continue
            assert state.get(dep) != 1, " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
