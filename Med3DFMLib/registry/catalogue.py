"""The model registry file (models.json): locating, loading and validating it.

The registry is data, not code: a JSON list of models checked against Resources/models.schema.json,
so a typo in a private registry is reported with the file and the offending field instead of
surfacing later as a confusing KeyError in the middle of inference.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.resources import resources_dir

REGISTRY_ENV = "MED3DFM_REGISTRY"
SCHEMA_NAME = "models.schema.json"
PLACEHOLDER_SHA256 = "0" * 64

_SCHEMA_CACHE: Dict[str, Any] = {}


@dataclass
class Catalogue:
    """A validated registry file plus the folder its `bundled` paths are relative to."""

    path: Path
    data: Dict[str, Any]
    base: Path = field(default_factory=resources_dir)  # bundled files live in Resources/, whichever registry lists them

    @property
    def entries(self) -> List[Dict[str, Any]]:
        return list(self.data.get("models", []))


def default_registry_path() -> Path:
    """`MED3DFM_REGISTRY` if set (a private registry), else Resources/models.json."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override).expanduser()
    return resources_dir() / "models.json"


def load_schema() -> Dict[str, Any]:
    """The registry JSON Schema shipped in Resources/ (read once per process)."""
    path = resources_dir() / SCHEMA_NAME
    key = str(path)
    if key not in _SCHEMA_CACHE:
        try:
            _SCHEMA_CACHE[key] = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise Med3DFMError(f"cannot read the registry schema {path}: {err.strerror or err}") from None
        except json.JSONDecodeError as err:
            raise Med3DFMError(f"the registry schema {path} is not valid JSON ({err})") from None
    return _SCHEMA_CACHE[key]


def _validator(schema: Dict[str, Any]) -> Any:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def _where(error: Any) -> str:
    parts = [str(p) for p in error.absolute_path]
    return "/".join(parts) if parts else "(top level)"


def schema_errors(data: Any, schema: Optional[Dict[str, Any]] = None) -> List[str]:
    """Readable schema violations, most relevant first ("models/0/files/0/sha256: ...")."""
    import jsonschema

    schema = schema if schema is not None else load_schema()
    errors = sorted(_validator(schema).iter_errors(data), key=jsonschema.exceptions.relevance)
    return [f"{_where(e)}: {e.message}" for e in errors]


def _semantic_errors(data: Dict[str, Any]) -> List[str]:
    """Checks JSON Schema cannot express: unique id@version, unique file names and label values."""
    problems: List[str] = []
    seen = set()
    for index, entry in enumerate(data.get("models", [])):
        key = (entry["id"], entry["version"])
        if key in seen:
            problems.append(f"models/{index}: duplicate model {entry['id']}@{entry['version']}")
        seen.add(key)
        names = [f["name"] for f in entry["files"]]
        if len(set(names)) != len(names):
            problems.append(f"models/{index}/files: duplicate file names")
        values = [label["value"] for label in entry.get("labels", [])]
        if len(set(values)) != len(values):
            problems.append(f"models/{index}/labels: duplicate label values")
    return problems


def read_catalogue(path: Optional[os.PathLike] = None) -> Catalogue:
    """Load and validate a registry file; every problem becomes one clear Med3DFMError."""
    path = Path(path).expanduser() if path is not None else default_registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Med3DFMError(f"model registry not found: {path}") from None
    except OSError as err:
        raise Med3DFMError(f"cannot read model registry {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise Med3DFMError(
            f"model registry {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    problems = schema_errors(data)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise Med3DFMError(f"model registry {path} does not match {SCHEMA_NAME}: {problems[0]}{more}")
    problems = _semantic_errors(data)
    if problems:
        raise Med3DFMError(f"model registry {path} is invalid: {'; '.join(problems)}")
    return Catalogue(path=path, data=data)


def load_registry(path: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """The validated registry as a dict (`{"schema_version": 1, "models": [...]}`)."""
    return read_catalogue(path).data


def validate_entry(entry: Dict[str, Any], origin: str) -> None:
    """Check one model entry (e.g. from an imported bundle) against the schema."""
    problems = schema_errors({"schema_version": 1, "models": [entry]})
    if problems:
        raise Med3DFMError(f"{origin}: model entry does not match {SCHEMA_NAME}: {problems[0]}")


_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def is_valid_id(text: str) -> bool:
    return bool(_ID_RE.match(text)) and len(text) <= 100


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """`id@version` -> (id, version); a bare id -> (id, None)."""
    if "@" in spec:
        model_id, version = spec.rsplit("@", 1)
        return model_id, (version or None)
    return spec, None


def version_key(version: str) -> Tuple[Any, ...]:
    """Sort key for semantic versions: numeric parts compare as numbers, a release beats its pre-release."""
    core, _, pre = version.partition("-")
    core = core.split("+", 1)[0]
    numbers = tuple(int(p) if p.isdigit() else -1 for p in core.split("."))
    return numbers, (0, pre) if pre else (1, "")


def entry_key(entry: Dict[str, Any]) -> str:
    return f"{entry['id']}@{entry['version']}"
