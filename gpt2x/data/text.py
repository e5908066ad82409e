"""Any local text: one file, every *.txt under a directory, or a glob; each file is one document."""

import glob
from pathlib import Path

from gpt2x.data.shards import prepare_token_shards

_GLOB_CHARS = frozenset("*?[")


def text_files(path: str) -> list[Path]:
    """The files data.path names: the file itself, all *.txt under a directory (recursively), or a glob's matches."""
    if not path:
        raise FileNotFoundError("data=text needs data.path: a text file, a directory of *.txt files, or a glob")
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        what = f"directory {path} holds no *.txt files"
    elif _GLOB_CHARS & set(path):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        what = f"glob {path} matches no files"
    else:
        files, what = [], f"{path} does not exist"
    if not files:
        raise FileNotFoundError(
            f"data.path={path}: {what}; set data.path to a text file, a directory of *.txt files, or a glob "
            "such as 'corpus/**/*.md'"
        )
    return files


def prepare(cfg) -> Path:
    """Tokenize the files at data.path (sorted, EOT between files) into cached train/val shards."""
    return prepare_token_shards(cfg, [f.read_text(encoding="utf-8") for f in text_files(cfg.path)])
