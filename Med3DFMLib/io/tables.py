"""Tab-separated tables, the format Slicer loads as a table node."""

from __future__ import annotations

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
