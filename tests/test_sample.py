"""gpt2x-sample: continuations from pretrained transformers weights or from a gpt2x checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_train

from gpt2x.data.tokenizer import gpt2_encoding
from gpt2x.sample import main


def printed_samples(capsys) -> list[str]:
    """The samples gpt2x-sample printed to stdout ("--- sample i" before each)."""
    out = capsys.readouterr().out
    return [chunk.split("\n", 1)[1].removesuffix("\n") for chunk in out.split("--- sample ")[1:]]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sample_run")
    run_train(run_dir, ["optim.max_steps=2", "checkpoint_interval=1"])
    return run_dir / "checkpoints" / "step_000001.pt"


def test_greedy_sample_from_a_local_transformers_gpt2_equals_transformers_generate(hf_gpt2_dir, capsys):
    prompt = "Hello, I'm a language model,"
    assert main(["--pretrained", str(hf_gpt2_dir), "--prompt", prompt, "--num-samples", "1",
                 "--max-tokens", "10", "--temperature", "0"]) == 0  # fmt: skip
    enc = gpt2_encoding()
    idx = torch.tensor([enc.encode(prompt)])
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    want = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False, pad_token_id=50256)
    assert printed_samples(capsys) == [enc.decode(want[0].tolist())]


def test_samples_from_a_training_checkpoint_are_reproducible_per_seed(tiny_checkpoint, capsys):
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "First Citizen:", "--num-samples", "2",
            "--max-tokens", "8"]  # fmt: skip
    main(args + ["--seed", "1"])
    a = printed_samples(capsys)
    main(args + ["--seed", "1"])
    b = printed_samples(capsys)
    main(args + ["--seed", "2"])
    c = printed_samples(capsys)
    assert len(a) == 2 and a == b and a != c
    assert all(t.startswith("First Citizen:") and len(t) > len("First Citizen:") for t in a)


def test_an_empty_prompt_samples_unconditionally_and_endoftext_in_a_prompt_is_allowed(tiny_checkpoint, capsys):
    base = ["--checkpoint", str(tiny_checkpoint), "--num-samples", "2", "--max-tokens", "6", "--temperature", "0"]
    assert main(base + ["--prompt", ""]) == 0
    unconditional = printed_samples(capsys)
    assert main(base + ["--prompt", "<|endoftext|>"]) == 0
    # an empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples did, and leaves that token out
    assert ["<|endoftext|>" + t for t in unconditional] == printed_samples(capsys)
    assert main(base + ["--prompt", "First Citizen:<|endoftext|>Second"]) == 0
    assert all(t.startswith("First Citizen:<|endoftext|>Second") for t in printed_samples(capsys))


def test_training_with_an_empty_or_endoftext_sample_prompt_finishes_with_its_samples(tmp_path):
    import json

    for name, prompt in [("empty", "''"), ("eot", "'Hi<|endoftext|>'")]:
        summary = run_train(tmp_path / name, ["optim.max_steps=1", f"sample_prompt={prompt}"])
        assert summary["steps"] == 1 and (tmp_path / name / "summary.json").is_file()
        samples = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert samples and all(s["sample"].startswith("Hi<|endoftext|>" if name == "eot" else "") for s in samples)


@pytest.mark.slow
def test_the_gpt2x_sample_command_exits_0_with_the_samples_on_stdout(tiny_checkpoint):
    command = Path(sys.executable).parent / "gpt2x-sample"
    result = subprocess.run(
        [command, "--checkpoint", tiny_checkpoint, "--prompt", "First", "--num-samples", "2", "--max-tokens", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample ") == 2 and "First" in result.stdout
    assert "[" not in result.stderr  # no Python list of the samples on stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "-0.5", "argument --temperature: must be >= 0"),
        ("--top-k", "0", "argument --top-k: must be an integer >= 1, got 0"),
        ("--max-tokens", "0", "argument --max-tokens: must be an integer >= 1, got 0"),
        ("--num-samples", "-1", "argument --num-samples: must be an integer >= 1, got -1"),
        ("--device", "cuda:7" if torch.cuda.is_available() else "cuda", "argument --device: cuda"),
        ("--device", "mps" if not torch.backends.mps.is_available() else "gpu", "argument --device:"),
        ("--device", "tpu9", "argument --device: 'tpu9' is not a device; use cpu, cuda, cuda:N or mps"),
    ],
)
def test_gpt2x_sample_refuses_a_bad_flag_naming_it_before_loading(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "missing.pt"), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpt2x_sample_says_whether_the_checkpoint_is_missing_or_a_directory(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "step_000001.pt")])
    err = capsys.readouterr().err
    assert f"argument --checkpoint: {tmp_path / 'step_000001.pt'} does not exist" in err and "resume" not in err
    run_dir = tiny_checkpoint.parent.parent
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(run_dir)])
    assert f"{run_dir} is a directory; give a checkpoint file, e.g. {tiny_checkpoint}" in capsys.readouterr().err


def test_sampling_needs_exactly_one_source():
    with pytest.raises(SystemExit):
        main(["--prompt", "x"])
