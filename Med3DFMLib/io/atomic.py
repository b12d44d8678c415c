"""Atomic writes: a result is either complete at its final path or absent.

Every writer produces a temporary file in the destination folder and renames it into place,
so a crash, a cancel or a full disk never leaves a half-written file under the user's name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from Med3DFMLib.errors import Med3DFMError

PathLike = Union[str, os.PathLike]


def check_writable(path: PathLike, overwrite: bool = True) -> Path:
    """Fail early, before any work, if `path` cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise Med3DFMError(f"output path is a folder, not a file: {path}")
    if not folder.is_dir():
        raise Med3DFMError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise Med3DFMError(f"output folder is not writable: {folder}")
    if path.exists() and not overwrite:
        raise Med3DFMError(f"output file already exists (use --overwrite to replace it): {path}")
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffixes (e.g. `.seg.nrrd`) so writers that choose a format
    by extension still work.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes owner-only files; a result should get the usual permissions (or keep
        # those of the file it replaces).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
