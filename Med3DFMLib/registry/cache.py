"""The per-user model cache: where downloaded and imported weights live, and who may write there.

Layout: `<home>/models/<id>/<version>/<file name>`, plus `model.json` (the entry the files were
installed for, so installed models stay listable offline and without the registry), `.lock`
(held while writing) and `<file>.partial` (an unfinished download, kept for resuming).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.weights import sha256_of

HOME_ENV = "MED3DFM_HOME"
ENTRY_FILE = "model.json"
LOCK_FILE = ".lock"
PARTIAL_SUFFIX = ".partial"


def models_home() -> Path:
    """`MED3DFM_HOME` if set, else the platform's per-user cache folder + `med3dfm`."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "med3dfm" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "med3dfm"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "med3dfm"


def version_dir(model_id: str, version: str) -> Path:
    return models_home() / "models" / model_id / version


def cached_file(model_id: str, version: str, name: str) -> Path:
    return version_dir(model_id, version) / name


def partial_path(final: Path) -> Path:
    """Unfinished downloads get a suffix so they never look installed."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def read_stored_entry(folder: Path) -> Optional[Dict[str, Any]]:
    """The entry recorded beside installed files, or None if absent/unreadable."""
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        return None
    if entry.get("id") != folder.parent.name or entry.get("version") != folder.name:
        return None
    return entry


def write_stored_entry(folder: Path, entry: Dict[str, Any]) -> None:
    from Med3DFMLib.io.atomic import write_text_atomic

    write_text_atomic(folder / ENTRY_FILE, json.dumps(entry, indent=2, sort_keys=True) + "\n")


def stored_entries() -> Iterator[Dict[str, Any]]:
    """Entries of everything installed in the cache (downloaded or imported)."""
    root = models_home() / "models"
    if not root.is_dir():
        return
    for id_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for ver_dir in sorted(p for p in id_dir.iterdir() if p.is_dir()):
            entry = read_stored_entry(ver_dir)
            if entry is not None:
                yield entry


# --- hashing with a per-process memo: a model used twice in one session is hashed once ---------

_HASHES: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: Path, fresh: bool = False) -> str:
    """sha256 of `path`, remembered while the file's size and mtime are unchanged.

    `fresh=True` (used by `verify`) always rereads the file, so tampering is found even if it kept
    size and timestamp.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if fresh or key not in _HASHES:
        _HASHES[key] = sha256_of(path)
    return _HASHES[key]


def remember_sha256(path: Path, digest: str) -> None:
    stat = path.stat()
    _HASHES[(str(path.resolve()), stat.st_size, stat.st_mtime_ns)] = digest


# --- inter-process lock ------------------------------------------------------------------------

def _try_lock(handle: IO[bytes]) -> bool:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _unlock(handle: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ModelLock:
    """Exclusive lock on one model version's cache folder, so two processes never write it at once.

    The OS drops the lock when its holder dies, so a crashed download cannot block others forever.
    The lock file itself is left in place: deleting it would let a third process lock a new file
    while the second still holds the old one.
    """

    def __init__(self, folder: Path, on_wait: Optional[Callable[[float], None]] = None) -> None:
        self.folder = folder
        self.on_wait = on_wait
        self._handle: Optional[IO[bytes]] = None

    def __enter__(self) -> "ModelLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / LOCK_FILE, "a+b")
        except OSError as err:
            raise Med3DFMError(f"cannot write to the model cache {self.folder}: {err.strerror or err}") from None
        started = time.monotonic()
        while not _try_lock(handle):
            if self.on_wait is not None:
                self.on_wait(time.monotonic() - started)
            time.sleep(0.1)
        self._handle = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            try:
                _unlock(self._handle)
            finally:
                self._handle.close()
                self._handle = None


def installed_files(entry: Dict[str, Any]) -> List[Path]:
    """Cache paths of an entry's files that exist (size not checked)."""
    folder = version_dir(entry["id"], entry["version"])
    return [folder / f["name"] for f in entry["files"] if (folder / f["name"]).is_file()]
