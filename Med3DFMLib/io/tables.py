"""Tab-separated tables, the format Slicer loads as a table node."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from Med3DFMLib.io.atomic import PathLike, write_text_atomic


def format_tsv(columns: Sequence[str], rows: Iterable[Sequence[Any]], comments: Sequence[str] = ()) -> str:
    """TSV text; `comments` become leading `# ` lines (Slicer and pandas both skip them)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("\t", " ").replace("\n", " ")

    lines = [f"# {comment}" for comment in comments]
    lines.append("\t".join(columns))
    lines.extend("\t".join(cell(v) for v in row) for row in rows)
    return "\n".join(lines) + "\n"


def write_tsv(path: PathLike, columns: Sequence[str], rows: Iterable[Sequence[Any]], comments: Sequence[str] = ()) -> None:
    write_text_atomic(path, format_tsv(columns, rows, comments))


def resolve_listed_path(value: str, base: Path) -> Path:
    """A path given in a list file (CSV): `~` expanded, relative paths taken from the list's own folder."""
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def read_list_text(path: Path) -> str:
    """The text of a list file (CSV, a BOM allowed), or one clear line saying why it cannot be read."""
    from Med3DFMLib.errors import Med3DFMError

    if not path.is_file():
        raise Med3DFMError(f"list file not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise Med3DFMError(f"cannot read list file {path}: {err}") from None
