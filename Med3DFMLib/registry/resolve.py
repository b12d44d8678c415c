"""Turning `--model SPEC` into a verified weight file on disk.

Order: a copy bundled with Med3DFM, then the user cache, then a download (only when allowed).
Every file is checked against its sha256 before it is handed out, so a truncated or tampered file
is never silently loaded into a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress
from Med3DFMLib.registry import cache
from Med3DFMLib.registry.catalogue import (
    Catalogue,
    entry_key,
    read_catalogue,
    split_spec,
    version_key,
)

_PATH_SUFFIXES = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".onnx", ".h5", ".npz"}


@dataclass
class ResolvedModel:
    """A model ready to load: its verified weight file and the card describing it."""

    id: str
    version: str
    weights: Path
    sha256: str
    card: Dict[str, Any]
    source: str  # "bundled" | "cache" | "download" | "file"
    files: Dict[str, Path] = field(default_factory=dict)  # every file of the model, by name


@dataclass
class KnownModel:
    """One id@version with where its entry came from (the registry or the cache's model.json)."""

    entry: Dict[str, Any]
    origin: str  # "registry" | "cache"
    base: Optional[Path] = None  # folder that `bundled` paths are relative to (registry entries)

    @property
    def key(self) -> str:
        return entry_key(self.entry)

    def bundled_path(self, file: Dict[str, Any]) -> Optional[Path]:
        if self.origin != "registry" or "bundled" not in file or self.base is None:
            return None
        return self.base / file["bundled"]


def known_models(catalogue: Catalogue) -> List[KnownModel]:
    """Registry entries, plus cache-only models (imported or dropped from the registry since)."""
    models = [KnownModel(entry, "registry", catalogue.base) for entry in catalogue.entries]
    keys = {m.key for m in models}
    for entry in cache.stored_entries():
        if entry_key(entry) not in keys:
            models.append(KnownModel(entry, "cache"))
            keys.add(entry_key(entry))
    return models


def find_models(spec: str, catalogue: Catalogue) -> Tuple[str, Optional[str], List[KnownModel]]:
    """All known versions matching `id` or `id@version` (newest first); unknown -> Med3DFMError."""
    model_id, version = split_spec(spec)
    models = known_models(catalogue)
    matches = [m for m in models if m.entry["id"] == model_id]
    if not matches:
        ids = sorted({m.entry["id"] for m in models})
        known = ", ".join(ids) if ids else "none"
        raise Med3DFMError(f"unknown model {model_id!r} (known models: {known}; registry {catalogue.path})")
    if version is not None:
        exact = [m for m in matches if m.entry["version"] == version]
        if not exact:
            versions = ", ".join(sorted((m.entry["version"] for m in matches), key=version_key))
            raise Med3DFMError(f"model {model_id} has no version {version} (known versions: {versions})")
        matches = exact
    matches.sort(key=lambda m: version_key(m.entry["version"]), reverse=True)
    return model_id, version, matches


def newest_entry(spec: str, registry: Optional[str] = None) -> Dict[str, Any]:
    """The registry or cache entry `id` (its newest version) or `id@version` names; unknown -> Med3DFMError."""
    return find_models(spec, read_catalogue(registry))[2][0].entry


def looks_like_path(spec: str) -> bool:
    """A spec is a file path if it has a folder part, a weight-file suffix, or names an existing file."""
    if os.sep in spec or "/" in spec or (os.altsep and os.altsep in spec):
        return True
    if Path(spec).suffix.lower() in _PATH_SUFFIXES:
        return True
    return Path(spec).is_file()


def _resolve_file(spec: str) -> ResolvedModel:
    from Med3DFMLib.weights import read_card

    path = Path(spec).expanduser()
    card = read_card(path)  # refuses pickle formats and files without a card
    path = path.resolve()
    digest = cache.file_sha256(path)
    model_id = str(card.get("id") or path.stem)
    version = str(card.get("version") or "unversioned")
    return ResolvedModel(model_id, version, path, digest, card, "file", {path.name: path})


def _check(path: Path, file: Dict[str, Any]) -> Optional[str]:
    """None if `path` has the registry's size and sha256, else what is wrong."""
    try:
        actual_size = path.stat().st_size
    except OSError as err:
        return f"{path}: cannot read ({err.strerror or err})"
    if actual_size != file["size"]:
        return f"{path} is {actual_size} bytes, the registry says {file['size']}"
    actual = cache.file_sha256(path)
    if actual != file["sha256"]:
        return f"{path} has sha256 {actual}, the registry says {file['sha256']}"
    return None


def _locate_file(known: KnownModel, file: Dict[str, Any], problems: List[str]) -> Optional[Tuple[Path, str]]:
    """A verified local copy of one file: (path, "bundled"|"cache"), or None."""
    bundled = known.bundled_path(file)
    if bundled is not None:
        if not bundled.is_file():
            problems.append(f"the bundled copy {bundled} is missing")
        else:
            problem = _check(bundled, file)
            if problem is None:
                return bundled, "bundled"
            problems.append(f"bundled copy {problem}")
    cached = cache.cached_file(known.entry["id"], known.entry["version"], file["name"])
    if cached.is_file():
        problem = _check(cached, file)
        if problem is None:
            return cached, "cache"
        problems.append(f"cached copy {problem}")
    return None


def _weights_name(entry: Dict[str, Any]) -> str:
    for file in entry["files"]:
        if file["name"].lower().endswith(".safetensors"):
            return file["name"]
    return entry["files"][0]["name"]


def _wait_message(progress: Optional[Progress], label: str) -> Any:
    said = [False]

    def on_wait(seconds: float) -> None:
        if progress is not None and (not said[0] or int(seconds * 10) % 20 == 0):
            progress.update("download", 0.0, f"{label}: waiting for another process that is installing it")
            said[0] = True

    return on_wait


def resolve_known(
    known: KnownModel,
    progress: Optional[Progress] = None,
    allow_download: bool = True,
    timeout: Optional[float] = None,
    retries: Optional[int] = None,
) -> ResolvedModel:
    """Verified local paths for every file of one id@version, downloading missing ones if allowed."""
    from Med3DFMLib.registry.download import download_file

    entry = known.entry
    label = known.key
    problems: List[str] = []
    found: Dict[str, Tuple[Path, str]] = {}
    for file in entry["files"]:
        hit = _locate_file(known, file, problems)
        if hit is not None:
            found[file["name"]] = hit
    missing = [f for f in entry["files"] if f["name"] not in found]
    if missing:
        no_urls = [f["name"] for f in missing if not f["urls"]]
        if no_urls:
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise Med3DFMError(
                f"model {label}: file {no_urls[0]} is not installed and has no download URL{detail}; "
                "import it with `setup_models.py import FILE`"
            )
        if not allow_download:
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise Med3DFMError(
                f"model {label} is not installed{detail}; download it with `setup_models.py download {label}` "
                "or import a copy with `setup_models.py import FILE`"
            )
        folder = cache.version_dir(entry["id"], entry["version"])
        with cache.ModelLock(folder, on_wait=_wait_message(progress, label)):
            for file in missing:
                # Another process may have installed it while we waited for the lock.
                final = folder / file["name"]
                if final.is_file() and _check(final, file) is None:
                    found[file["name"]] = (final, "cache")
                    continue
                download_file(
                    file["urls"], final, file["sha256"], file["size"], progress=progress,
                    label=f"{label} {file['name']}", timeout=timeout, retries=retries,
                )
                found[file["name"]] = (final, "download")
            cache.write_stored_entry(folder, entry)
    weights_name = _weights_name(entry)
    weights, source = found[weights_name]
    sha = next(f["sha256"] for f in entry["files"] if f["name"] == weights_name)
    return ResolvedModel(
        id=entry["id"], version=entry["version"], weights=weights, sha256=sha, card=entry, source=source,
        files={name: path for name, (path, _) in found.items()},
    )


def resolve_model(
    spec: str,
    registry: Optional[str] = None,
    progress: Optional[Progress] = None,
    allow_download: bool = True,
) -> ResolvedModel:
    """Resolve a registry id (`id` or `id@version`) or a `.safetensors` path to a verified weight file.

    Without a version the newest known version is used. Network is touched only here, and only
    when the model is neither bundled nor in the cache and `allow_download` is true.
    """
    spec = str(spec).strip()
    if not spec:
        raise Med3DFMError("no model given")
    if looks_like_path(spec):
        return _resolve_file(spec)
    catalogue = read_catalogue(registry)
    _, _, matches = find_models(spec, catalogue)
    return resolve_known(matches[0], progress=progress, allow_download=allow_download)


def check_adapter_encoder(adapter_card: Dict[str, Any], encoder_sha256: str) -> None:
    """Refuse to pair an adapter with an encoder other than the exact one it was trained on."""
    wanted = adapter_card.get("encoder")
    name = adapter_card.get("id", "this adapter")
    if not isinstance(wanted, dict) or not wanted.get("sha256"):
        raise Med3DFMError(f"adapter {name} does not say which encoder it needs (no encoder sha256 in its card)")
    if wanted["sha256"] != encoder_sha256:
        version = f"@{wanted['version']}" if wanted.get("version") else ""
        raise Med3DFMError(
            f"adapter {name} needs encoder {wanted.get('id', '?')}{version} with sha256 {wanted['sha256']}, "
            f"but the loaded encoder has sha256 {encoder_sha256}"
        )
