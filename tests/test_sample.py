"""gpt2x-sample: continuations from pretrained transformers weights or from a gpt2x checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import run_train

from gpt2x.data.tokenizer import gpt2_encoding
from gpt2x.sample import main


def test_greedy_sample_from_a_local_transformers_gpt2_equals_transformers_generate(hf_gpt2_dir, capsys):
    prompt = "Hello, I'm a language model,"
    texts = main(["--pretrained", str(hf_gpt2_dir), "--prompt", prompt, "--num-samples", "1",
                  "--max-tokens", "10", "--temperature", "0"])  # fmt: skip
    enc = gpt2_encoding()
    idx = torch.tensor([enc.encode(prompt)])
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    want = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False, pad_token_id=50256)
    assert texts == [enc.decode(want[0].tolist())]
    assert texts[0] in capsys.readouterr().out


def test_samples_from_a_training_checkpoint_are_reproducible_per_seed(tmp_path):
    run_train(tmp_path, ["optim.max_steps=2", "checkpoint_interval=1"])
    ckpt = str(tmp_path / "checkpoints" / "step_000001.pt")
    args = ["--checkpoint", ckpt, "--prompt", "First Citizen:", "--num-samples", "2", "--max-tokens", "8"]
    a, b = main(args + ["--seed", "1"]), main(args + ["--seed", "1"])
    c = main(args + ["--seed", "2"])
    assert a == b and a != c
    assert all(t.startswith("First Citizen:") and len(t) > len("First Citizen:") for t in a)


def test_sampling_needs_exactly_one_source():
    with pytest.raises(SystemExit):
        main(["--prompt", "x"])
