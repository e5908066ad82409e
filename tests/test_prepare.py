"""gpt2x-prepare: FineWeb-style sharding of a local jsonl source, exact resume after SIGKILL, and data=fineweb_edu."""

import json
import random
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_env
from omegaconf import OmegaConf

from gpt2x.config import FinewebDataConfig
from gpt2x.data import fineweb
from gpt2x.data.fineweb import prepare_fineweb
from gpt2x.data.prepare import main as prepare_main
from gpt2x.data.shards import ShardLoader, load_shard, shard_paths
from gpt2x.data.tokenizer import EOT, gpt2_encoding

WORDS = "the of and to in is was for on that with as by at from his her it an be this are which ship sea rain".split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}) + "\n")
    return path


def expected_stream(docs: list[str]) -> np.ndarray:
    enc = gpt2_encoding()
    return np.concatenate([np.asarray([EOT] + enc.encode_ordinary(doc), dtype=np.uint16) for doc in docs])


def read_stream(out_dir: Path) -> tuple[list[str], np.ndarray]:
    """Shard names in stream order (val_000000 first, then train by index) and all their tokens concatenated."""
    names = sorted((p.name for p in out_dir.glob("*.npy")), key=lambda name: int(name[-10:-4]))
    return names, np.concatenate([load_shard(out_dir / name) for name in names])


@pytest.mark.slow  # two tokenizer worker processes
def test_shards_hold_eot_then_each_document_in_order_val_first(tmp_path):
    docs = make_documents(300)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=1000, num_proc=2, data_files=str(source))

    names, stream = read_stream(out)
    np.testing.assert_array_equal(stream, expected_stream(docs))
    assert names[0] == "val_000000.npy"
    assert names[1:] == [f"train_{i:06d}.npy" for i in range(1, len(names))]
    sizes = [len(load_shard(out / name)) for name in names]
    assert sizes[:-1] == [1000] * (len(names) - 1) and 0 < sizes[-1] <= 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["docs_done"] == 300 and manifest["tokens"] == len(stream)

    # The training loader reads them as they are.
    x, y = ShardLoader(shard_paths(out, "train"), B=2, T=16).next_batch()
    assert x.shape == y.shape == (2, 16)
    np.testing.assert_array_equal(x.flatten().numpy(), stream[1000 : 1000 + 32])


def test_document_longer_than_several_shards_is_split_across_them(tmp_path):
    docs = ["short one", " ".join(["word"] * 2500), "tail doc"]  # the middle one is ~2500 tokens: 3 shards of 1000
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=1000, num_proc=1, data_files=str(source))
    names, stream = read_stream(out)
    np.testing.assert_array_equal(stream, expected_stream(docs))
    assert len(names) == 3


def test_cli_json_source_with_max_docs_and_idempotent_rerun(tmp_path, capsys):
    docs = make_documents(50)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    args = ["--source", "json", "--data-files", str(source), "--out", str(tmp_path / "out"), "--shard-size", "200"]
    prepare_main(args + ["--num-proc", "1", "--max-docs", "20"])
    assert "shards ready in" in capsys.readouterr().out
    _, stream = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(stream, expected_stream(docs[:20]))

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.*")}
    prepare_main(args + ["--num-proc", "2", "--max-docs", "20"])  # finished: nothing is rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.*")} == mtimes

    with pytest.raises(ValueError, match=r"other settings \(shard_size: 200 -> 300"):
        prepare_main(args[:-1] + ["300", "--max-docs", "20"])
    with pytest.raises(ValueError, match="text field 'body' is not in the dataset's columns"):
        prepare_main(args[:-3] + [str(tmp_path / "other"), "--text-field", "body"])


def test_foreign_shards_without_manifest_are_not_overwritten(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(5))
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "train_000001.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="no manifest.json"):
        prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=100, num_proc=1, data_files=str(source))


# gpt2x-prepare that SIGKILLs itself and its tokenizer workers (its process group) right after the manifest records
# argv[1] shards: an os.replace that dies after renaming manifest.json into place, as a crash at that point would.
_KILLED_AFTER_SHARDS = """
import json, os, signal, sys
from gpt2x.data.fineweb import MANIFEST
from gpt2x.data.prepare import main

min_shards, real_replace = int(sys.argv[1]), os.replace

def replace_then_die_at_min_shards(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if os.path.basename(dst) == MANIFEST:
        with open(dst) as f:
            if len(json.load(f)["shards"]) >= min_shards:
                os.killpg(0, signal.SIGKILL)

os.replace = replace_then_die_at_min_shards
main(sys.argv[2:])
"""


def _run_cli_until(args: list[str], manifest: Path, min_shards: int) -> dict:
    """Run gpt2x-prepare in a subprocess that SIGKILLs itself and its workers once `min_shards` shards are recorded."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_SHARDS, str(min_shards), *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group: the kill takes the tokenizer workers too, and only them
    )
    state = json.loads(manifest.read_text())
    if state["complete"]:
        pytest.fail("gpt2x-prepare finished before it reached its kill point; use more documents")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return state


@pytest.mark.slow
def test_sigkilled_prep_resumes_to_exactly_the_uninterrupted_shards(tmp_path, recwarn):
    docs = make_documents(6000, seed=1)  # ~210 shards of 1000 tokens
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    reference = prepare_fineweb(
        "json", None, "train", tmp_path / "reference", shard_size=1000, num_proc=1, data_files=str(source)
    )

    out = tmp_path / "out"
    args = ["--source", "json", "--data-files", str(source), "--out", str(out), "--shard-size", "1000"]
    args += ["--num-proc", "2"]
    # Killed inside the first batch of documents: the resume re-reads the stream up to the saved position.
    first = _run_cli_until(args, out / "manifest.json", min_shards=1)
    assert first["stream_doc"] == 0
    # Killed later: the resume seeks the stream with its saved `datasets` state instead of re-reading.
    second = _run_cli_until(args, out / "manifest.json", min_shards=45)
    assert second["stream_doc"] > 0 and second["stream_state"] is not None
    assert len(second["shards"]) > len(first["shards"])

    prepare_fineweb("json", None, "train", out, shard_size=1000, num_proc=2, data_files=str(source))
    assert not [w for w in recwarn if "re-reading" in str(w.message)], "the resume should have sought, not re-read"
    ref_names, ref_stream = read_stream(reference)
    names, stream = read_stream(out)
    assert names == ref_names
    np.testing.assert_array_equal(stream, ref_stream)
    np.testing.assert_array_equal(stream, expected_stream(docs))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def _data_cfg(**overrides):
    return OmegaConf.structured(FinewebDataConfig(name="fineweb_edu", **overrides))


def test_data_fineweb_edu_points_at_gpt2x_prepare_until_shards_exist(tmp_path):
    cfg = _data_cfg(cache_dir=str(tmp_path / "cache"), shard_size=1000, num_proc=2)
    expected_dir = tmp_path / "cache" / "fineweb_edu"
    with pytest.raises(FileNotFoundError) as info:
        fineweb.prepare(cfg)
    message = str(info.value)
    assert "data.path" in message
    assert (
        f"gpt2x-prepare --source HuggingFaceFW/fineweb-edu --name sample-10BT --split train --text-field text "
        f"--out {expected_dir} --shard-size 1000 --num-proc 2" in message
    )

    # An interrupted prep is reported as unfinished, with the command that continues it.
    docs = make_documents(40)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = prepare_fineweb(
        "json", None, "train", tmp_path / "shards", shard_size=300, num_proc=1, data_files=str(source)
    )
    cfg = _data_cfg(path=str(out), hf_path="json", hf_name=None)
    assert fineweb.prepare(cfg) == out
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(FileNotFoundError, match="unfinished") as info:
        fineweb.prepare(cfg)
    resume = str(info.value).split("`")[1]  # the command it says to run, with the settings the prep started with
    assert f"--data-files {source}" in resume and "--shard-size 300" in resume
    prepare_main(shlex.split(resume)[1:])
    assert fineweb.prepare(cfg) == out
    with pytest.raises(ValueError, match="data.hf_path=HuggingFaceFW/fineweb-edu"):
        fineweb.prepare(_data_cfg(path=str(out)))


def test_single_shard_warns_that_there_is_no_train_split(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=10_000, num_proc=1, data_files=str(source))
    assert any("no train split" in str(w.message) for w in caught)


def test_prepare_refuses_an_empty_dataset_saying_it_has_no_documents(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"produced no documents \(an empty file\?\); check --source"):
        prepare_main(["--source", "json", "--data-files", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o"),
                      "--num-proc", "1"])  # fmt: skip


def test_prepare_names_the_file_and_line_of_malformed_json(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(5))
    lines = source.read_text().splitlines()
    lines[3] = lines[3][:-1]  # drop the closing brace of the 4th document
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{source} line 4 is not valid JSON"):
        prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=50, num_proc=1, data_files=str(source))


def test_prepare_skips_and_counts_rows_whose_text_is_null(tmp_path):
    docs = make_documents(6)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": None if i in (1, 4) else doc}) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 documents whose 'text' is null"):
        prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=30, num_proc=1,
                        data_files=str(tmp_path / "docs.jsonl"))  # fmt: skip
    _, stream = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(stream, expected_stream([d for i, d in enumerate(docs) if i not in (1, 4)]))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["null_texts"] == 2


def test_prepared_shards_carry_checksums_and_a_corrupted_one_fails_naming_its_path(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(40))
    out = prepare_fineweb("json", None, "train", tmp_path / "out", shard_size=300, num_proc=1, data_files=str(source))
    train = shard_paths(out, "train")
    ShardLoader(train, B=2, T=8).next_batch()
    tokens = load_shard(train[0]).copy()
    tokens[:2] = tokens[1::-1]  # two in-vocabulary tokens swapped
    np.save(train[0], tokens)
    with pytest.raises(ValueError, match=f"token shard {train[0]} has sha256 .*rerun gpt2x-prepare with the settings"):
        ShardLoader(train, B=2, T=8)


def test_shards_prepared_before_checksums_are_used_with_a_warning_until_a_rerun_records_them(tmp_path, caplog):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(40))
    args = ["--source", "json", "--data-files", str(source), "--out", str(tmp_path / "out"), "--shard-size", "300",
            "--num-proc", "1"]  # fmt: skip
    prepare_main(args)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k != "shard_sha256"}  # a manifest from before checksums
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(old))
    cfg = _data_cfg(path=str(tmp_path / "out"), hf_path="json", hf_name=None, num_proc=1)
    assert fineweb.prepare(cfg) == tmp_path / "out"
    assert "prepared before gpt2x-prepare recorded checksums, so they are used unchecked" in caplog.text
    command = caplog.text.split("rerun `")[1].split("`")[0]
    prepare_main(shlex.split(command)[1:])  # the command it names records them
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
