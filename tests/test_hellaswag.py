"""HellaSwag: rendering, acc_norm scoring by hand, a tiny GPT that learned the right endings, rank splits over gloo."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gpt2x.config import ModelConfig
from gpt2x.data.tokenizer import gpt2_encoding
from gpt2x.evals import hellaswag
from gpt2x.model.gpt import GPT

# HellaSwag's format (ind, activity_label, ctx_a, ctx_b, ctx, endings, label, split, split_type, source_id).
CONTEXTS = [
    ("A man is sitting on a roof.", "he"),
    ("A woman holds a violin.", "she"),
    ("The chef cracks two eggs.", "then he"),
    ("A dog runs across the park.", "it"),
    ("Two kids build a sandcastle.", "they"),
]
ENDINGS = [
    "starts pulling up roofing on a roof.",
    "plays a slow song for the crowd.",
    "whisks them quickly in a bowl.",
    "catches the red frisbee in the air.",
    "decorate the towers with small shells.",
]


def make_examples() -> list[dict]:
    examples = []
    for i, (ctx_a, ctx_b) in enumerate(CONTEXTS):
        label = (2 * i + 1) % 4
        wrong = [ENDINGS[(i + k) % len(ENDINGS)] for k in (1, 2, 3)]
        endings = wrong[:label] + [ENDINGS[i]] + wrong[label:]
        examples.append(
            {
                "ind": i,
                "activity_label": "Test",
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}",
                "split": "val",
                "split_type": "indomain",
                "label": label,
                "endings": endings,
                "source_id": f"test~{i}",
            }
        )
    return examples


def write_examples(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))
    return path


def test_render_example_masks_exactly_the_ending_tokens():
    example = make_examples()[0]
    tokens, mask, label = hellaswag.render_example(example)
    enc = gpt2_encoding()
    ctx = enc.encode_ordinary(example["ctx"])
    assert tokens.shape == mask.shape and tokens.shape[0] == 4 and tokens.dtype == mask.dtype == torch.long
    assert label == example["label"]
    for i, ending in enumerate(example["endings"]):
        end = enc.encode_ordinary(" " + ending)
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end and tokens[i, n:].eq(0).all()
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.shape[1] - n)


def test_most_likely_row_uses_mean_ending_loss_not_sum():
    # Logits that are log-probabilities make each position's loss exactly -log p(target).
    V = 4
    tokens = torch.tensor([[1, 2, 0, 0], [1, 3, 3, 3]])  # row 0: 1 ending token; row 1: 3 ending tokens
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])

    def position(target: int, loss: float) -> list[float]:
        p_target = math.exp(-loss)
        probs = [(1 - p_target) / (V - 1)] * V
        probs[target] = p_target
        return [math.log(p) for p in probs]

    uniform = [0.0] * V
    logits = torch.tensor(
        [
            [position(2, 1.0), uniform, uniform, uniform],  # mean 1.0, sum 1.0
            [position(3, 0.5), position(3, 0.5), position(3, 0.5), uniform],  # mean 0.5, sum 1.5
        ]
    )
    assert hellaswag.most_likely_row(tokens, mask, logits) == 1  # by sum it would be row 0
    logits[0, 0] = torch.tensor(position(2, 0.1))
    assert hellaswag.most_likely_row(tokens, mask, logits) == 0


@pytest.fixture(scope="module")
def learned_model():
    """A tiny GPT that has memorized each context followed by its right ending."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    rows = []
    for example in make_examples():
        tokens, mask, label = hellaswag.render_example(example)
        rows.append(tokens[label, : int(mask[label].nonzero().max()) + 1])
    length = max(len(row) for row in rows)
    idx = torch.stack([torch.cat([row, row.new_zeros(length - len(row))]) for row in rows])
    targets = torch.stack([torch.cat([row[1:], row.new_full((length - len(row) + 1,), -100)]) for row in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run faster on one thread, and far faster on a busy machine
    try:
        for _ in range(50):
            _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 1.5
    return model


@pytest.mark.slow
def test_evaluate_picks_the_endings_a_trained_model_learned(tmp_path, learned_model):
    path = write_examples(tmp_path / "hellaswag_val.jsonl", make_examples())
    learned_model.train()
    assert hellaswag.evaluate(learned_model, path, "cpu") == (5, 5)
    assert learned_model.training  # evaluate puts back the mode it found
    assert hellaswag.evaluate(learned_model, path, "cpu", limit=2) == (2, 2)

    # The endings shuffled to wrong labels: the model's picks are now all wrong.
    wrong = [{**example, "label": (example["label"] + 1) % 4} for example in make_examples()]
    assert hellaswag.evaluate(learned_model, write_examples(tmp_path / "wrong.jsonl", wrong), "cpu") == (0, 5)

    # Rank shares without torch.distributed: disjoint, and together the whole set.
    shares = [hellaswag.evaluate(learned_model, path, "cpu", rank=r, world_size=2) for r in range(2)]
    assert shares == [(3, 3), (2, 2)]


def test_missing_file_names_the_hellaswag_path_setting_and_downloads_are_cached(tmp_path):
    with pytest.raises(FileNotFoundError, match="hellaswag_path"):
        next(hellaswag.iterate_examples(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="split='dev'"):
        hellaswag.download("dev", tmp_path)
    cached = write_examples(tmp_path / "hellaswag_val.jsonl", make_examples())
    assert hellaswag.download("val", tmp_path) == cached  # already there: no network access


def _gloo_worker(rank: int, world_size: int, init_file: str, model_path: str, data_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = GPT(ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
        model.load_state_dict(torch.load(model_path, weights_only=True))
        result = hellaswag.evaluate(model, data_path, "cpu", rank=rank, world_size=world_size)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_all_reduces_counts_across_gloo_ranks(tmp_path, learned_model):
    model_path = tmp_path / "model.pt"
    torch.save(learned_model.state_dict(), model_path)
    data_path = write_examples(tmp_path / "hellaswag_val.jsonl", make_examples())
    args = (2, str(tmp_path / "init"), str(model_path), str(data_path), str(tmp_path))
    mp.spawn(_gloo_worker, args=args, nprocs=2, join=True)
    # 5 examples over 2 ranks (3 + 2, rank 1 runs one uncounted forward): every rank returns the global totals.
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [[5, 5], [5, 5]]
