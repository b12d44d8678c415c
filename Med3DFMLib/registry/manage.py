"""Offline model management: list, verify, import (file or zip bundle) and remove.

Import is how machines without internet get models: a `.safetensors` file (its card says which
id/version it is) or a `.zip` bundle with a models.json-style list and the files, each checked
against its sha256 before it is moved into the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress
from Med3DFMLib.registry import cache
from Med3DFMLib.registry.catalogue import (
    Catalogue,
    entry_key,
    is_valid_id,
    read_catalogue,
    schema_errors,
    split_spec,
    version_key,
)
from Med3DFMLib.registry.resolve import KnownModel, ResolvedModel, find_models, known_models

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}


# --- list -------------------------------------------------------------------------------------

def _file_location(known: KnownModel, file: Dict[str, Any]) -> Tuple[str, Optional[Path]]:
    """Where one file is: ("bundled"|"cache", path), ("damaged", path) if its size is wrong, or ("missing", None).

    Only sizes are compared here (listing must be fast); `verify` reads the content.
    """
    damaged: Optional[Path] = None
    for location, path in (
        ("bundled", known.bundled_path(file)),
        ("cache", cache.cached_file(known.entry["id"], known.entry["version"], file["name"])),
    ):
        if path is not None and path.is_file():
            if path.stat().st_size == file["size"]:
                return location, path
            damaged = damaged or path
    return ("damaged", damaged) if damaged is not None else ("missing", None)


def _installed_where(locations: Sequence[str]) -> str:
    found = set(locations)
    if found <= {"bundled"}:
        return "bundled"
    if found <= {"cache"}:
        return "cache"
    if found <= {"bundled", "cache"}:
        return "bundled+cache"
    if found == {"missing"}:
        return "not installed"
    if "damaged" in found:
        return "damaged"
    return "incomplete"


def list_models(registry: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per known id@version: id, version, task, title, licence, size, installed, path, files."""
    catalogue = read_catalogue(registry)
    rows = []
    for known in known_models(catalogue):
        entry = known.entry
        files = []
        for file in entry["files"]:
            location, path = _file_location(known, file)
            files.append({"name": file["name"], "location": location, "path": str(path) if path else None})
        weights = next((f for f in files if f["name"].lower().endswith(".safetensors")), files[0])
        rows.append({
            "id": entry["id"],
            "version": entry["version"],
            "task": entry.get("task", "?"),
            "title": entry.get("title", ""),
            "licence": entry.get("licence", "?"),
            "size": sum(int(f.get("size", 0)) for f in entry["files"]),
            "installed": _installed_where([f["location"] for f in files]),
            "path": weights["path"],
            "in_registry": known.origin == "registry",
            "files": files,
            "sample": entry.get("sample"),
        })
    rows.sort(key=lambda r: (r["id"], r["version"]))
    return rows


def newest_versions(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The newest version of each id among list_models' rows (what `models list` shows without --all-versions)."""
    newest: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if row["id"] not in newest or version_key(row["version"]) > version_key(newest[row["id"]]["version"]):
            newest[row["id"]] = row
    return [row for row in rows if newest[row["id"]] is row]


# --- verify -----------------------------------------------------------------------------------

@dataclass
class FileCheck:
    """The result of rehashing one installed (or expected) file."""

    id: str
    version: str
    name: str
    location: str  # "bundled" | "cache" | "not installed"
    path: Optional[str]
    ok: bool
    message: str

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _check_known(known: KnownModel, explicit: bool) -> List[FileCheck]:
    entry = known.entry
    checks: List[FileCheck] = []
    for file in entry["files"]:
        candidates: List[Tuple[str, Path]] = []
        bundled = known.bundled_path(file)
        if bundled is not None:
            candidates.append(("bundled", bundled))
        cached = cache.cached_file(entry["id"], entry["version"], file["name"])
        if cached.is_file():
            candidates.append(("cache", cached))
        if not candidates:
            if explicit:
                checks.append(FileCheck(entry["id"], entry["version"], file["name"], "not installed", None,
                                        False, "not installed"))
            continue
        for location, path in candidates:
            if not path.is_file():
                checks.append(FileCheck(entry["id"], entry["version"], file["name"], location, str(path), False,
                                        f"bundled file is missing: {path}"))
                continue
            actual = cache.file_sha256(path, fresh=True)
            size = path.stat().st_size
            if actual == file["sha256"] and size == file["size"]:
                checks.append(FileCheck(entry["id"], entry["version"], file["name"], location, str(path), True, "ok"))
            else:
                checks.append(FileCheck(
                    entry["id"], entry["version"], file["name"], location, str(path), False,
                    f"mismatch: sha256 {actual} ({size} bytes), expected {file['sha256']} ({file['size']} bytes)",
                ))
    return checks


def _has_local_copy(known: KnownModel) -> bool:
    entry = known.entry
    return any(
        known.bundled_path(f) is not None or cache.cached_file(entry["id"], entry["version"], f["name"]).is_file()
        for f in entry["files"]
    )


def verify_model(spec: str, registry: Optional[str] = None) -> List[FileCheck]:
    """Rehash every local copy (bundled and cached) of `id` or `id@version`.

    Without a version, every installed version is checked; a model with nothing installed gives one
    failed check ("not installed") because the user asked about it by name.
    """
    catalogue = read_catalogue(registry)
    model_id, version, matches = find_models(spec, catalogue)
    if version is None:
        present = [m for m in matches if _has_local_copy(m)]
        if not present:
            return [FileCheck(model_id, matches[0].entry["version"], "-", "not installed", None, False, "not installed")]
        matches = present
    checks: List[FileCheck] = []
    for known in matches:
        checks.extend(_check_known(known, explicit=True))
    return checks


def verify_models(specs: Optional[Sequence[str]] = None, registry: Optional[str] = None) -> List[FileCheck]:
    """`verify_model` for each spec, or for every model with a local or bundled copy when none given."""
    if specs:
        checks: List[FileCheck] = []
        for spec in specs:
            checks.extend(verify_model(spec, registry))
        return checks
    catalogue = read_catalogue(registry)
    checks = []
    for known in known_models(catalogue):
        if _has_local_copy(known):
            checks.extend(_check_known(known, explicit=False))
    return checks


# --- import -----------------------------------------------------------------------------------

def _copy_hashing(source: IO[bytes], target: Path, limit: Optional[int] = None) -> Tuple[str, int]:
    """Copy while hashing; stop just past `limit` bytes so an oversized zip member cannot fill the disk."""
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
            out.write(block)
            if limit is not None and size > limit:
                break
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _check_safetensors_header(path: Path, origin: str) -> None:
    """Cheap format check (8-byte length + JSON header), so a renamed pickle is never installed."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise ValueError("too short")
            (length,) = struct.unpack("<Q", head)
            if length > 100_000_000 or length > path.stat().st_size:
                raise ValueError("bad header length")
            header = json.loads(handle.read(length).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise Med3DFMError(f"{origin} is not a valid safetensors file ({err})") from None


def _registry_conflict(catalogue: Catalogue, entry: Dict[str, Any], origin: str) -> Optional[Dict[str, Any]]:
    """The registry's entry for the same id@version; refuse if its files differ (a new file needs a new version)."""
    for known in catalogue.entries:
        if entry_key(known) == entry_key(entry):
            ours = {f["name"]: f["sha256"] for f in known["files"]}
            for file in entry["files"]:
                if file["name"] in ours and ours[file["name"]] != file["sha256"]:
                    raise Med3DFMError(
                        f"{origin}: {file['name']} of {entry_key(entry)} differs from the registry "
                        f"(sha256 {file['sha256']}, registry {ours[file['name']]}); a changed file needs a new version"
                    )
            return known
    return None


def _check_cache_conflict(entry: Dict[str, Any], origin: str) -> None:
    folder = cache.version_dir(entry["id"], entry["version"])
    stored = cache.read_stored_entry(folder)
    if stored is None:
        return
    theirs = {f["name"]: f.get("sha256") for f in stored["files"]}
    for file in entry["files"]:
        if file["name"] in theirs and theirs[file["name"]] != file["sha256"] and (folder / file["name"]).exists():
            raise Med3DFMError(
                f"{origin}: a different {entry_key(entry)} is already installed in {folder}; "
                f"remove it first (`setup_models.py remove {entry_key(entry)}`) or give the new model a new version"
            )


def _import_safetensors(path: Path, catalogue: Catalogue) -> ResolvedModel:
    from Med3DFMLib.io.atomic import atomic_path
    from Med3DFMLib.weights import read_card, sha256_of

    card = read_card(path)
    model_id, version = card.get("id"), card.get("version")
    if not isinstance(model_id, str) or not isinstance(version, str) or not is_valid_id(model_id) or not version:
        raise Med3DFMError(
            f"{path.name}: its model card needs an `id` (lower-case letters, digits, . _ -) and a `version` "
            "to be imported; use it directly with --model PATH instead"
        )
    if "/" in version or "\\" in version or version in (".", ".."):
        raise Med3DFMError(f"{path.name}: invalid version {version!r} in its model card")
    digest, size = sha256_of(path), path.stat().st_size
    entry = next((e for e in catalogue.entries if e["id"] == model_id and e["version"] == version), None)
    if entry is not None:
        match = next((f for f in entry["files"] if f["sha256"] == digest), None)
        if match is None:
            raise Med3DFMError(
                f"{path.name} claims to be {model_id}@{version} but its sha256 {digest} matches no file of that "
                "registry entry; a changed model needs a new version"
            )
        name = match["name"]
    else:
        name = f"{model_id}.safetensors"
        entry = {k: v for k, v in card.items() if k != "files"}
        entry["files"] = [{"name": name, "sha256": digest, "size": size, "urls": []}]
    _check_cache_conflict({"id": model_id, "version": version,
                           "files": [{"name": name, "sha256": digest}]}, path.name)
    folder = cache.version_dir(model_id, version)
    with cache.ModelLock(folder):
        with atomic_path(folder / name) as tmp:
            with open(path, "rb") as source:
                copied, _ = _copy_hashing(source, tmp)
            if copied != digest:
                raise Med3DFMError(f"{path} changed while it was being imported; try again")
        cache.remember_sha256(folder / name, digest)
        cache.write_stored_entry(folder, entry)
    return ResolvedModel(model_id, version, folder / name, digest, entry, "cache", {name: folder / name})


def _bundle_root(archive: zipfile.ZipFile, origin: str) -> str:
    names = archive.namelist()
    if "models.json" in names:
        return ""
    nested = [n for n in names if n.endswith("/models.json") and n.count("/") == 1]
    if len(nested) == 1:
        return nested[0][: -len("models.json")]
    raise Med3DFMError(f"{origin} is not a model bundle: it has no models.json at its top level")


def _import_bundle(path: Path, catalogue: Catalogue, progress: Optional[Progress]) -> List[ResolvedModel]:
    from Med3DFMLib.io.atomic import atomic_path

    origin = path.name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise Med3DFMError(f"{origin} is not a readable zip file ({err})") from None
    installed: List[ResolvedModel] = []
    with archive:
        root = _bundle_root(archive, origin)
        try:
            data = json.loads(archive.read(root + "models.json").decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise Med3DFMError(f"{origin}: models.json is not valid JSON ({err})") from None
        problems = schema_errors(data)
        if problems:
            raise Med3DFMError(f"{origin}: models.json does not match models.schema.json: {problems[0]}")
        members = set(archive.namelist())
        entries = data["models"]
        if not entries:
            raise Med3DFMError(f"{origin}: models.json lists no models")
        for index, entry in enumerate(entries):
            registry_entry = _registry_conflict(catalogue, entry, origin)
            _check_cache_conflict(entry, origin)
            folder = cache.version_dir(entry["id"], entry["version"])
            stored = json.loads(json.dumps(registry_entry if registry_entry is not None else entry))
            if registry_entry is None:
                for file in stored["files"]:
                    file.pop("bundled", None)  # bundled paths mean nothing outside the registry's folder
            with cache.ModelLock(folder):
                with contextlib.ExitStack() as stack:
                    # All files of the model land in temporary names first; they are renamed into
                    # place together only after every checksum matched.
                    for file in entry["files"]:
                        candidates = [root + file["name"]] + ([root + file["bundled"]] if "bundled" in file else [])
                        member = next((m for m in candidates if m in members), None)
                        final = folder / file["name"]
                        if member is None:
                            if final.is_file() and cache.file_sha256(final) == file["sha256"]:
                                continue
                            raise Med3DFMError(f"{origin}: the bundle lacks {file['name']} of {entry_key(entry)}")
                        tmp = stack.enter_context(atomic_path(final))
                        with archive.open(member) as source:
                            digest, size = _copy_hashing(source, tmp, limit=file["size"])
                        if digest != file["sha256"] or size != file["size"]:
                            raise Med3DFMError(
                                f"{origin}: {file['name']} of {entry_key(entry)} does not match its entry "
                                f"(sha256 {digest}, {size} bytes; expected {file['sha256']}, {file['size']} bytes); "
                                "nothing was installed"
                            )
                        if file["name"].lower().endswith(".safetensors"):
                            _check_safetensors_header(tmp, f"{origin}: {file['name']}")
                cache.write_stored_entry(folder, stored)
            if progress is not None:
                progress.update("import", (index + 1) / len(entries), f"{entry_key(entry)} installed")
            files = {f["name"]: folder / f["name"] for f in entry["files"]}
            weights_name = next((n for n in files if n.lower().endswith(".safetensors")), next(iter(files)))
            sha = next(f["sha256"] for f in entry["files"] if f["name"] == weights_name)
            installed.append(ResolvedModel(entry["id"], entry["version"], files[weights_name], sha, stored,
                                           "cache", files))
    return installed


def import_model(path: os.PathLike, registry: Optional[str] = None,
                 progress: Optional[Progress] = None) -> List[ResolvedModel]:
    """Install a `.safetensors` model file or a `.zip` bundle into the cache, without network."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise Med3DFMError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES or suffix == ".safetensors":
        catalogue = read_catalogue(registry)
        return [_import_safetensors(path, catalogue)]  # read_card refuses pickle formats
    if suffix == ".zip":
        catalogue = read_catalogue(registry)
        return _import_bundle(path, catalogue, progress)
    raise Med3DFMError(f"cannot import {path.name}: expected a .safetensors model file or a .zip model bundle")


# --- remove -----------------------------------------------------------------------------------

@dataclass
class RemoveResult:
    removed: List[Path] = field(default_factory=list)  # cache folders deleted
    bundled: List[Path] = field(default_factory=list)  # bundled copies that stay (never deleted)


def remove_model(spec: str, registry: Optional[str] = None) -> RemoveResult:
    """Delete `id` (all versions) or `id@version` from the user cache; bundled files are never touched."""
    model_id, version = split_spec(spec)
    catalogue = read_catalogue(registry)
    result = RemoveResult()
    for known in known_models(catalogue):
        entry = known.entry
        if entry["id"] == model_id and (version is None or entry["version"] == version):
            for file in entry["files"]:
                bundled = known.bundled_path(file)
                if bundled is not None and bundled.is_file():
                    result.bundled.append(bundled)
    if not is_valid_id(model_id):
        raise Med3DFMError(f"invalid model id {model_id!r}")
    id_dir = cache.models_home() / "models" / model_id
    folders = []
    if id_dir.is_dir():
        folders = [p for p in sorted(id_dir.iterdir()) if p.is_dir() and (version is None or p.name == version)]
    for folder in folders:
        with cache.ModelLock(folder):
            for item in folder.iterdir():
                if item.name == cache.LOCK_FILE:
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        with contextlib.suppress(OSError):
            (folder / cache.LOCK_FILE).unlink()
            folder.rmdir()
        result.removed.append(folder)
    with contextlib.suppress(OSError):
        id_dir.rmdir()
    if not result.removed:
        if result.bundled:
            raise Med3DFMError(
                f"{spec} is bundled with Med3DFM ({result.bundled[0]}); bundled files are never removed, "
                "and there is no copy in the cache"
            )
        find_models(spec, catalogue)  # unknown id -> lists the known ones
        raise Med3DFMError(f"{spec} is not installed in the cache ({cache.models_home()})")
    return result
