"""The offline GPT-2 tokenizer is the real GPT-2 BPE."""

from helpers import needs_tiny_shakespeare

from gpt2x.data.tokenizer import EOT, gpt2_encoding


def test_encoding_gives_gpt2_ids_for_build_nanogpt_prompt():
    assert gpt2_encoding().encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_encoding_has_gpt2_vocab_and_endoftext_token():
    enc = gpt2_encoding()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_encoding_round_trips_text_and_is_built_once():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nÜmlauts, emoji 🙂 and\ttabs  too."
    assert gpt2_encoding().decode(gpt2_encoding().encode_ordinary(text)) == text
    assert gpt2_encoding() is gpt2_encoding()


def test_tiny_shakespeare_encodes_to_338025_tokens():
    text = needs_tiny_shakespeare().read_text(encoding="utf-8")
    assert len(gpt2_encoding().encode_ordinary(text)) == 338025
