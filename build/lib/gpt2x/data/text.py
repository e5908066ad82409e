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


def read_utf8(path: Path) -> str:
    """The text of `path`, or a ValueError naming the file and the byte offset where it stops being UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text: byte offset {e.start} ({data[e.start : e.start + 4]!r}...: {e.reason}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of data.path"
        ) from None


def prepare(cfg) -> Path:
    """Tokenize the files at data.path (sorted, EOT between files) into cached train/val shards."""
    return prepare_token_shards(cfg, [read_utf8(f) for f in text_files(cfg.path)])
