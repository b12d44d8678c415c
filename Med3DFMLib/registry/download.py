"""Fetching one weight file over HTTP(S): mirrors, resume, timeouts, checksum, atomic install.

Standard library only (urllib): one GET per attempt, so no extra dependency is worth it. The caller
holds the model's cache lock; this module only guarantees that the final path appears complete and
verified, or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, List, Optional, Sequence

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress
from Med3DFMLib.registry.cache import partial_path, remember_sha256
from Med3DFMLib.weights import sha256_of

TIMEOUT_ENV = "MED3DFM_DOWNLOAD_TIMEOUT"
RETRIES_ENV = "MED3DFM_DOWNLOAD_RETRIES"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
CHUNK = 1 << 16


class _Retryable(Exception):
    """The connection failed in a way worth retrying on the same URL (dropped, stalled, 5xx)."""


class _NextMirror(Exception):
    """This URL cannot give us the file (404, refused, wrong content); try the next mirror."""


def _env_number(name: str, default: float, kind: type = float) -> Any:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise Med3DFMError(f"{name} must be a number, not {text!r}") from None
    if value < 0:
        raise Med3DFMError(f"{name} must not be negative, not {text!r}")
    return value


def download_timeout() -> float:
    """Socket timeout in seconds (`MED3DFM_DOWNLOAD_TIMEOUT`, default 30): a stalled server fails instead of hanging."""
    return float(_env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT, float))


def download_retries() -> int:
    """Extra attempts per URL after a dropped or stalled connection (`MED3DFM_DOWNLOAD_RETRIES`, default 3)."""
    return int(_env_number(RETRIES_ENV, DEFAULT_RETRIES, int))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _user_agent() -> str:
    from Med3DFMLib import __version__

    return f"Med3DFM/{__version__} (+python-urllib)"


def _describe_url_error(err: urllib.error.URLError, timeout: float) -> Exception:
    reason = err.reason
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return _Retryable(f"timed out after {timeout:g} s waiting for the server")
    if isinstance(reason, ConnectionRefusedError):
        return _NextMirror("connection refused")
    if isinstance(reason, socket.gaierror):
        return _NextMirror(f"host not found ({reason.strerror or reason})")
    if isinstance(reason, OSError):
        return _Retryable(reason.strerror or str(reason))
    return _NextMirror(str(reason))


def _free_space_check(folder: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise Med3DFMError(
            f"not enough disk space in {folder}: the download needs {_mb(needed)}, {_mb(free)} free "
            f"(set MED3DFM_HOME to a folder on a bigger disk)"
        )


def _local_write_error(err: OSError, partial: Path) -> Med3DFMError:
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        try:
            partial.unlink()
        except OSError:
            pass
        return Med3DFMError(
            f"no space left on the disk while writing {partial} (the partial download was deleted; "
            "free some space or set MED3DFM_HOME to another disk)"
        )
    return Med3DFMError(f"cannot write {partial}: {err.strerror or err}")


class _Reporter:
    """Throttled progress: JSON consumers get a few lines per second, not one per chunk."""

    def __init__(self, progress: Optional[Progress], label: str, total: int, url: str) -> None:
        self.progress, self.label, self.total, self.url = progress, label, total, url
        self._last = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        fraction = done / self.total if self.total else 0.0
        message = f"{self.label}: {_mb(done)} of {_mb(self.total)}" if self.total else f"{self.label}: {_mb(done)}"
        self.progress.update("download", fraction, message, bytes=done, total=self.total, url=self.url)


def _fsync(handle: Any) -> None:
    """Flush to disk before the rename, so a power cut cannot leave an installed file with holes."""
    try:
        os.fsync(handle.fileno())
    except OSError as err:
        if err.errno not in (errno.EINVAL, getattr(errno, "ENOTSUP", -1)):  # not supported here: fine
            raise


def _fetch(url: str, partial: Path, size: int, timeout: float, report: _Reporter) -> None:
    """One attempt: append the missing bytes of `url` to `partial` (resuming with a Range request)."""
    start = partial.stat().st_size if partial.is_file() else 0
    if size and start >= size:
        if start == size:
            return  # complete already; the caller verifies it
        partial.unlink()
        start = 0
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            partial.unlink()  # our partial file does not fit the server's file; start over
            raise _Retryable("the server refused to resume (HTTP 416)") from None
        message = f"HTTP {err.code} {err.reason}"
        if err.code >= 500 or err.code in (408, 429):
            raise _Retryable(message) from None
        raise _NextMirror(message) from None
    except urllib.error.URLError as err:
        raise _describe_url_error(err, timeout) from None
    except (socket.timeout, TimeoutError):
        raise _Retryable(f"timed out after {timeout:g} s waiting for the server") from None
    except (http.client.HTTPException, OSError) as err:
        raise _Retryable(f"connection failed ({err.__class__.__name__}: {err})") from None

    with response:
        status = getattr(response, "status", None) or 200
        mode = "wb"
        if start and status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise _NextMirror(f"the server answered the resume request with a wrong range "
                                  f"({response.headers.get('Content-Range')!r})")
            mode = "ab"
        else:
            start = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        if size and length is not None and length.isdigit() and start + int(length) != size:
            raise _NextMirror(f"the server's file is {start + int(length)} bytes, the registry says {size}")
        done = start
        report.total = size or (start + int(length) if length and length.isdigit() else 0)
        try:
            out = open(partial, mode)
        except OSError as err:
            raise _local_write_error(err, partial) from None
        try:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (socket.timeout, TimeoutError):
                    raise _Retryable(f"timed out after {timeout:g} s with no data "
                                     f"({_mb(done)} of {_mb(size)} received)") from None
                except http.client.IncompleteRead:
                    raise _Retryable(f"the connection closed early ({_mb(done)} of {_mb(size)} received)") from None
                except (http.client.HTTPException, OSError) as err:
                    raise _Retryable(f"the connection broke ({err.__class__.__name__}) after {_mb(done)}") from None
                if not chunk:
                    break
                if size and done + len(chunk) > size:
                    out.close()
                    partial.unlink()
                    raise _NextMirror(f"the server sent more than the expected {size} bytes")
                try:
                    out.write(chunk)
                except OSError as err:
                    raise _local_write_error(err, partial) from None
                done += len(chunk)
                report(done)
        except BaseException:
            with contextlib.suppress(OSError):
                out.close()  # keeps the bytes received so far for a resume
            raise
        try:
            out.flush()
            _fsync(out)
            out.close()
        except OSError as err:
            with contextlib.suppress(OSError):
                out.close()
            raise _local_write_error(err, partial) from None
        report(done, force=True)
        if size and done < size:
            raise _Retryable(f"the connection closed early ({_mb(done)} of {_mb(size)} received)")


def download_file(
    urls: Sequence[str],
    dest: Path,
    sha256: str,
    size: int,
    progress: Optional[Progress] = None,
    label: str = "",
    timeout: Optional[float] = None,
    retries: Optional[int] = None,
) -> Path:
    """Download `dest` from the first mirror that yields a file with the right size and sha256.

    Bytes go to `<dest>.partial` (kept after a dropped or stalled connection so the next attempt
    resumes with a Range request; deleted when its content is wrong), and the file is renamed onto
    `dest` only after the checksum matches. Raises Med3DFMError naming each URL and what failed.
    """
    label = label or dest.name
    timeout = download_timeout() if timeout is None else timeout
    retries = download_retries() if retries is None else retries
    if not urls:
        raise Med3DFMError(f"{label} has no download URL in the registry")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    have = partial.stat().st_size if partial.is_file() else 0
    if size:
        _free_space_check(dest.parent, max(size - have, 0))
    failures: List[str] = []
    for url in urls:
        report = _Reporter(progress, label, size, url)
        for attempt in range(retries + 1):
            before = partial.stat().st_size if partial.is_file() else 0
            try:
                _fetch(url, partial, size, timeout, report)
            except _Retryable as err:
                if attempt < retries:
                    after = partial.stat().st_size if partial.is_file() else 0
                    if after <= before:
                        time.sleep(min(0.5 * 2 ** attempt, 5.0))  # no progress: back off a little
                    continue
                failures.append(f"{url}: {err}")
                break
            except _NextMirror as err:
                failures.append(f"{url}: {err}")
                break
            # Complete: check size and checksum before anything is called installed.
            actual_size = partial.stat().st_size
            if size and actual_size != size:
                partial.unlink()
                failures.append(f"{url}: got {actual_size} bytes, expected {size}")
                break
            actual = sha256_of(partial)
            if actual != sha256:
                partial.unlink()
                failures.append(f"{url}: checksum mismatch (expected sha256 {sha256}, got {actual}; download deleted)")
                break
            os.replace(partial, dest)
            remember_sha256(dest, actual)
            if progress is not None:
                progress.update("download", 1.0, f"{label}: done", bytes=actual_size, total=actual_size, url=url)
            return dest
    kept = ""
    if partial.is_file() and partial.stat().st_size:
        kept = f" ({_mb(partial.stat().st_size)} kept in {partial.name}; running the download again resumes)"
    raise Med3DFMError(f"could not download {label}: " + "; ".join(failures) + kept)
