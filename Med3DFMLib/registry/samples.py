"""A model's sample scan: fetched only when asked (`med3dfm models sample ID`), checked, cached.

A registry entry may name one scan to try the model on (`sample`: url, sha256, size, description).
It is downloaded with the model downloader (resume, timeouts, checksum before the file is called
installed) into `MED3DFM_HOME/samples/<id>/<version>/<file name>`; a file with the wrong checksum is
deleted with its folder, so a failed fetch leaves nothing that looks like a sample.
"""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress
from Med3DFMLib.registry import cache
from Med3DFMLib.registry.catalogue import entry_key, is_valid_id
from Med3DFMLib.registry.resolve import newest_entry

FOLDER = "samples"


def sample_of(spec: str, registry: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model entry, its sample) for `id` (newest version) or `id@version`; Med3DFMError if it names none."""
    entry = newest_entry(spec, registry)
    sample = entry.get("sample")
    if not isinstance(sample, dict):
        raise Med3DFMError(f"model {entry_key(entry)} names no sample scan in its registry entry")
    return entry, sample


def sample_file_name(sample: Dict[str, Any]) -> str:
    """The cached file's name: the last part of the sample's URL path (e.g. case_001.nii.gz)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(sample["url"]).path)).name
    if not is_valid_id(name.lower()):
        raise Med3DFMError(f"the sample URL {sample['url']} does not end in a usable file name")
    return name


def cached_sample(entry: Dict[str, Any], sample: Dict[str, Any]) -> Path:
    return cache.models_home() / FOLDER / entry["id"] / entry["version"] / sample_file_name(sample)


def fetch_sample(spec: str, registry: Optional[str] = None, output: Optional[Path] = None, progress: Optional[Progress] = None) -> Path:
    """The verified sample of `spec`: from the cache, else downloaded into it; copied (atomically) to
    `output` when given, and that path returned."""
    from Med3DFMLib.io.atomic import atomic_path, check_writable
    from Med3DFMLib.registry.download import download_file

    entry, sample = sample_of(spec, registry)
    target = cached_sample(entry, sample)
    if output is not None:
        output = Path(output) / target.name if Path(output).is_dir() else Path(output)
        check_writable(output)  # before the download, not after it
    label = f"{entry_key(entry)} sample"
    # one lock for every sample, in the samples folder itself, so a failed fetch can remove its own folder
    with cache.ModelLock(cache.models_home() / FOLDER):
        if not (target.is_file() and target.stat().st_size == sample["size"] and cache.file_sha256(target, fresh=True) == sample["sha256"]):
            try:
                download_file([sample["url"]], target, sample["sha256"], sample["size"], progress=progress, label=label)
            except Med3DFMError:
                _remove_empty_folders(target.parent)
                raise
    if output is None:
        return target
    with atomic_path(output) as tmp:
        shutil.copyfile(target, tmp)
    return output


def _remove_empty_folders(folder: Path) -> None:
    """Remove `folder` and its parents up to the samples folder while they are empty."""
    root = cache.models_home() / FOLDER
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (a partial download kept for a resume), or gone
            return
        folder = folder.parent
