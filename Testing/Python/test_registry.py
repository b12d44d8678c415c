"""Model registry: schema, resolution order, real downloads against a local HTTP server, import/remove/verify.

Downloads run the real urllib code against `registry_server.FileServer` on 127.0.0.1; weight files
are tiny random tensors written with `write_weights` (fixtures of the download code, not models).
Every test points MED3DFM_HOME at a temporary folder so the real cache is never touched.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from Med3DFMLib.errors import Med3DFMError  # noqa: E402
from Med3DFMLib.progress import Progress  # noqa: E402
from Med3DFMLib.registry import (  # noqa: E402
    check_adapter_encoder,
    import_model,
    list_models,
    load_registry,
    models_home,
    remove_model,
    resolve_model,
    verify_model,
)
from Med3DFMLib.registry.catalogue import PLACEHOLDER_SHA256, schema_errors  # noqa: E402
from Med3DFMLib.registry.cli import main as models_main  # noqa: E402
from Med3DFMLib.resources import resources_dir  # noqa: E402
from Med3DFMLib.weights import write_weights  # noqa: E402
from registry_server import FileServer, resolve_in_child  # noqa: E402


# --- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache per test; no registry override, no proxy for 127.0.0.1, quick retries."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MED3DFM_HOME", str(folder))
    monkeypatch.delenv("MED3DFM_REGISTRY", raising=False)
    monkeypatch.delenv("MED3DFM_RESOURCES", raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("MED3DFM_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("MED3DFM_DOWNLOAD_RETRIES", "2")
    return folder


@pytest.fixture
def resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Resources/ folder (schema copied in) for tests of bundled files."""
    folder = tmp_path / "Resources"
    (folder / "models").mkdir(parents=True)
    shutil.copy(resources_dir() / "models.schema.json", folder / "models.schema.json")
    monkeypatch.setenv("MED3DFM_RESOURCES", str(folder))
    return folder


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_weights(path: Path, model_id: str = "test-model", version: str = "1.0.0", seed: int = 0,
                 numel: int = 4096, **card: Any) -> bytes:
    """A small safetensors file with a card; returns its bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"layer.weight": torch.randn(numel, generator=generator)}
    full_card = {"id": model_id, "version": version, "task": "segment"}
    full_card.update(card)
    write_weights(path, tensors, full_card)
    return path.read_bytes()


def entry(model_id: str, version: str, files: List[Dict[str, Any]], task: str = "encoder",
          **extra: Any) -> Dict[str, Any]:
    """A schema-valid registry entry around `files`."""
    result = {
        "id": model_id, "version": version, "task": task, "title": f"{model_id} (test)",
        "description": "test fixture", "licence": "CC0-1.0", "files": files,
        "input": {"modality": "CT", "spacing": [1.5, 1.5, 1.5], "window": [32, 32, 32],
                  "intensity": {"method": "clip", "lower": -1000, "upper": 1000}, "orientation": "LPS"},
        "training": {"data": "none", "method": "none"}, "metrics": {},
    }
    result.update(extra)
    return result


def file_entry(name: str, data: bytes, urls: List[str], **extra: Any) -> Dict[str, Any]:
    return {"name": name, "sha256": sha(data), "size": len(data), "urls": urls, **extra}


def write_registry(path: Path, entries: List[Dict[str, Any]]) -> str:
    path.write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2), encoding="utf-8")
    return str(path)


def served_model(tmp_path: Path, server: FileServer, behaviour: str = "ok", numel: int = 4096,
                 model_id: str = "net-model", extra_urls: Optional[List[str]] = None,
                 registry_sha: Optional[str] = None) -> Dict[str, Any]:
    """A weight file on the test server and a registry listing it; returns the pieces."""
    data = make_weights(tmp_path / "source.safetensors", model_id, "1.0.0", numel=numel)
    url = server.add(f"/{model_id}.safetensors", data, behaviour)
    urls = (extra_urls or []) + [url]
    files = [file_entry(f"{model_id}.safetensors", data, urls)]
    if registry_sha is not None:
        files[0]["sha256"] = registry_sha
    registry = write_registry(tmp_path / "registry.json", [entry(model_id, "1.0.0", files)])
    return {"data": data, "url": url, "path": f"/{model_id}.safetensors", "registry": registry, "id": model_id}


def cache_folder(model_id: str, version: str = "1.0.0") -> Path:
    return models_home() / "models" / model_id / version


# --- the shipped registry -------------------------------------------------------------------------

def test_shipped_registry_matches_schema() -> None:
    import jsonschema

    schema = json.loads((resources_dir() / "models.schema.json").read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    data = json.loads((resources_dir() / "models.json").read_text())
    assert schema_errors(data) == []
    registry = load_registry(resources_dir() / "models.json")
    ids = [m["id"] for m in registry["models"]]
    assert "hippocampus-mr-demo" in ids


def test_shipped_bundled_files_verify() -> None:
    """Every bundled file in Resources/models.json exists and has the registry's sha256 and size.

    Fails (on purpose) while the demo entry still carries the placeholder checksum or the file is missing.
    """
    registry = load_registry(resources_dir() / "models.json")
    bundled = [m for m in registry["models"] if any("bundled" in f for f in m["files"])]
    assert bundled, "expected at least one bundled model"
    for model in bundled:
        for file in model["files"]:
            assert file["sha256"] != PLACEHOLDER_SHA256, f"{model['id']}: placeholder sha256 still in models.json"
        checks = verify_model(f"{model['id']}@{model['version']}")
        failures = [c.message for c in checks if not c.ok]
        assert not failures, failures
        assert {c.location for c in checks} >= {"bundled"}


@pytest.mark.parametrize("mutate, fragment", [
    (lambda e: e["files"][0].update(sha256="abc"), "sha256"),
    (lambda e: e.update(task="detect"), "task"),
    (lambda e: e.pop("labels"), "labels"),
    (lambda e: e["files"][0].update(name="weights.pt"), "name"),
    (lambda e: e["files"][0].update(bundled="../outside.safetensors"), "bundled"),
    (lambda e: e["input"].update(spacing=[1, 1]), "spacing"),
])
def test_registry_schema_errors_are_clear(tmp_path: Path, mutate: Any, fragment: str) -> None:
    bad = entry("bad-model", "1.0.0", [file_entry("bad.safetensors", b"x", [])], task="segment",
                labels=[{"value": 1, "name": "thing", "color": [1, 0, 0],
                         "terminology": {"category": ["SCT", "1", "a"], "type": ["SCT", "2", "b"]}}])
    mutate(bad)
    path = write_registry(tmp_path / "broken.json", [bad])
    with pytest.raises(Med3DFMError) as info:
        load_registry(path)
    message = str(info.value)
    assert "broken.json" in message and fragment in message
    assert "\n" not in message


def test_registry_not_json_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text('{"schema_version": 1, "models": [', encoding="utf-8")
    with pytest.raises(Med3DFMError, match=r"registry\.json is not valid JSON \(line 1"):
        load_registry(path)
    with pytest.raises(Med3DFMError, match="model registry not found"):
        load_registry(tmp_path / "nope.json")


def test_duplicate_entries_rejected(tmp_path: Path) -> None:
    one = entry("dup", "1.0.0", [file_entry("dup.safetensors", b"x", [])])
    path = write_registry(tmp_path / "dups.json", [one, one])
    with pytest.raises(Med3DFMError, match="duplicate model dup@1.0.0"):
        load_registry(path)


def test_adapter_requires_encoder_in_schema(tmp_path: Path) -> None:
    adapter = entry("an-adapter", "1.0.0", [file_entry("a.safetensors", b"x", [])], task="adapter")
    with pytest.raises(Med3DFMError, match="encoder"):
        load_registry(write_registry(tmp_path / "r.json", [adapter]))
    adapter["encoder"] = {"id": "enc", "sha256": "a" * 64}
    load_registry(write_registry(tmp_path / "r.json", [adapter]))


# --- registry override ------------------------------------------------------------------------------

def test_registry_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_weights(tmp_path / "m.safetensors", "private-model")
    path = write_registry(tmp_path / "private.json",
                          [entry("private-model", "1.0.0", [file_entry("private-model.safetensors", data, [])])])
    monkeypatch.setenv("MED3DFM_REGISTRY", path)
    assert [m["id"] for m in load_registry()["models"]] == ["private-model"]
    with pytest.raises(Med3DFMError) as info:
        resolve_model("hippocampus-mr-demo")
    assert "unknown model 'hippocampus-mr-demo'" in str(info.value) and "private-model" in str(info.value)
    monkeypatch.setenv("MED3DFM_REGISTRY", str(tmp_path / "broken.json"))
    (tmp_path / "broken.json").write_text("{}", encoding="utf-8")
    with pytest.raises(Med3DFMError, match="broken.json does not match models.schema.json"):
        resolve_model("private-model")


def test_registry_cli_flag_from_source_checkout(tmp_path: Path) -> None:
    data = make_weights(tmp_path / "m.safetensors", "flag-model")
    path = write_registry(tmp_path / "flag.json",
                          [entry("flag-model", "2.0.0", [file_entry("flag-model.safetensors", data, [])])])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MED3DFM_REGISTRY")}
    done = subprocess.run([sys.executable, str(REPO / "setup_models.py"), "list", "--json", "--registry", path],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["id"], r["version"], r["installed"]) for r in rows] == [("flag-model", "2.0.0", "not installed")]
    bad = subprocess.run([sys.executable, str(REPO / "setup_models.py"), "download", "nothing-here",
                          "--registry", path], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "unknown model 'nothing-here'" in bad.stderr and "flag-model" in bad.stderr
    usage = subprocess.run([sys.executable, str(REPO / "setup_models.py"), "frobnicate"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 2


# --- downloads ------------------------------------------------------------------------------------------

def test_download_then_cache(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server)
    stream = __import__("io").StringIO()
    resolved = resolve_model(model["id"], registry=model["registry"], progress=Progress("json", stream=stream))
    assert resolved.source == "download"
    assert resolved.weights == cache_folder(model["id"]) / f"{model['id']}.safetensors"
    assert resolved.weights.read_bytes() == model["data"]
    assert resolved.sha256 == sha(model["data"])
    assert resolved.card["id"] == model["id"]
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records and all(r["stage"] == "download" for r in records)
    assert records[-1]["fraction"] == 1.0
    again = resolve_model(f"{model['id']}@1.0.0", registry=model["registry"])
    assert again.source == "cache" and again.weights == resolved.weights
    assert server.requests_for(model["path"]) == [None]  # fetched once
    assert not list(cache_folder(model["id"]).glob("*.partial"))
    [row] = list_models(model["registry"])
    assert row["installed"] == "cache" and row["size"] == len(model["data"])


def test_resume_after_dropped_connection(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server, behaviour="drop:50000", numel=40000)
    resolved = resolve_model(model["id"], registry=model["registry"])
    assert resolved.source == "download"
    assert sha(resolved.weights.read_bytes()) == sha(model["data"])
    assert server.requests_for(model["path"]) == [None, "bytes=50000-"]


def test_resume_in_a_later_run(tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MED3DFM_DOWNLOAD_RETRIES", "0")
    model = served_model(tmp_path, server, behaviour="drop:30000", numel=40000)
    with pytest.raises(Med3DFMError) as info:
        resolve_model(model["id"], registry=model["registry"])
    assert model["url"] in str(info.value) and "closed early" in str(info.value)
    folder = cache_folder(model["id"])
    final = folder / f"{model['id']}.safetensors"
    assert not final.exists()
    assert (folder / f"{final.name}.partial").stat().st_size == 30000
    assert list_models(model["registry"])[0]["installed"] == "not installed"
    with pytest.raises(Med3DFMError, match="not installed"):
        resolve_model(model["id"], registry=model["registry"], allow_download=False)
    resolved = resolve_model(model["id"], registry=model["registry"])
    assert resolved.weights.read_bytes() == model["data"]
    assert server.requests_for(model["path"]) == [None, "bytes=30000-"]


def test_wrong_checksum_installs_nothing(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server, registry_sha="f" * 64)
    with pytest.raises(Med3DFMError) as info:
        resolve_model(model["id"], registry=model["registry"])
    message = str(info.value)
    assert model["url"] in message and "f" * 64 in message and sha(model["data"]) in message
    folder = cache_folder(model["id"])
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    assert list_models(model["registry"])[0]["installed"] == "not installed"


def test_404_names_url(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server, behaviour="404")
    with pytest.raises(Med3DFMError) as info:
        resolve_model(model["id"], registry=model["registry"])
    assert f"{model['url']}: HTTP 404" in str(info.value)
    assert len(server.requests_for(model["path"])) == 1  # a 404 is not retried


def test_connection_refused_names_url(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gone.safetensors"
    registry = write_registry(tmp_path / "r.json", [entry("gone", "1.0.0", [
        {"name": "gone.safetensors", "sha256": "a" * 64, "size": 10, "urls": [url]}])])
    with pytest.raises(Med3DFMError, match=f"{url}: connection refused"):
        resolve_model("gone", registry=registry)


def test_stalled_server_times_out(tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MED3DFM_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("MED3DFM_DOWNLOAD_RETRIES", "0")
    model = served_model(tmp_path, server, behaviour="stall")
    started = time.monotonic()
    with pytest.raises(Med3DFMError) as info:
        resolve_model(model["id"], registry=model["registry"])
    assert time.monotonic() - started < 5
    assert model["url"] in str(info.value) and "timed out after 0.5 s" in str(info.value)
    assert not (cache_folder(model["id"]) / f"{model['id']}.safetensors").exists()


def test_mirrors_tried_in_order(tmp_path: Path, server: FileServer) -> None:
    missing = server.url("/missing.safetensors")
    model = served_model(tmp_path, server, extra_urls=[missing])
    resolved = resolve_model(model["id"], registry=model["registry"])
    assert resolved.source == "download" and resolved.weights.read_bytes() == model["data"]
    assert server.requests_for("/missing.safetensors") == [None]
    assert server.requests_for(model["path"]) == [None]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to make writes fail with ENOSPC")
def test_disk_full_is_reported(tmp_path: Path, server: FileServer) -> None:
    """A real ENOSPC from the OS: the partial download path is a symlink to /dev/full."""
    model = served_model(tmp_path, server, numel=40000)
    folder = cache_folder(model["id"])
    folder.mkdir(parents=True)
    partial = folder / f"{model['id']}.safetensors.partial"
    partial.symlink_to("/dev/full")
    with pytest.raises(Med3DFMError, match="no space left"):
        resolve_model(model["id"], registry=model["registry"])
    assert not os.path.lexists(partial)
    assert not (folder / f"{model['id']}.safetensors").exists()


def test_two_processes_download_once(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server, behaviour="slow:0.05", numel=80000)  # ~320 kB, ~1 s to serve
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [context.Process(target=resolve_in_child, args=(model["id"], model["registry"], barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sorted(o[0] for o in outcomes) == ["cache", "download"], outcomes
    assert {o[2] for o in outcomes} == {sha(model["data"])}
    assert server.requests_for(model["path"]) == [None]  # the second process waited, then found it installed


# --- resolution order and specs ------------------------------------------------------------------------

def test_bundled_then_cache_then_download(tmp_path: Path, server: FileServer, resources: Path) -> None:
    data = make_weights(tmp_path / "b.safetensors", "bundled-model")
    url = server.add("/bundled-model.safetensors", data)
    bundled = resources / "models" / "bundled-model.safetensors"
    bundled.write_bytes(data)
    registry = write_registry(tmp_path / "private.json", [entry("bundled-model", "1.0.0", [
        file_entry("bundled-model.safetensors", data, [url], bundled="models/bundled-model.safetensors")])])
    first = resolve_model("bundled-model", registry=registry)
    assert (first.source, first.weights) == ("bundled", bundled)
    assert list_models(registry)[0]["installed"] == "bundled"
    bundled.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a damaged bundled copy is not used
    second = resolve_model("bundled-model", registry=registry)
    assert second.source == "download" and second.weights.read_bytes() == data
    third = resolve_model("bundled-model", registry=registry, allow_download=False)
    assert third.source == "cache"
    assert server.requests_for("/bundled-model.safetensors") == [None]


def test_newest_version_by_default(tmp_path: Path, resources: Path) -> None:
    old = make_weights(tmp_path / "old.safetensors", "multi", "1.9.0", seed=1)
    new = make_weights(tmp_path / "new.safetensors", "multi", "1.10.0", seed=2)
    (resources / "models" / "old.safetensors").write_bytes(old)
    (resources / "models" / "new.safetensors").write_bytes(new)
    registry = write_registry(tmp_path / "r.json", [
        entry("multi", "1.9.0", [file_entry("multi.safetensors", old, [], bundled="models/old.safetensors")]),
        entry("multi", "1.10.0", [file_entry("multi.safetensors", new, [], bundled="models/new.safetensors")]),
    ])
    assert resolve_model("multi", registry=registry).version == "1.10.0"
    assert resolve_model("multi@1.9.0", registry=registry).sha256 == sha(old)
    with pytest.raises(Med3DFMError, match="no version 3.0.0 .*1.9.0, 1.10.0"):
        resolve_model("multi@3.0.0", registry=registry)


def test_not_installed_without_download(tmp_path: Path, server: FileServer) -> None:
    model = served_model(tmp_path, server)
    with pytest.raises(Med3DFMError, match="setup_models.py download net-model@1.0.0"):
        resolve_model(model["id"], registry=model["registry"], allow_download=False)
    assert server.requests_for(model["path"]) == []


def test_resolve_safetensors_path(tmp_path: Path) -> None:
    data = make_weights(tmp_path / "local.safetensors", "local-model", "0.3.0", labels=[])
    resolved = resolve_model(str(tmp_path / "local.safetensors"))
    assert (resolved.id, resolved.version, resolved.source) == ("local-model", "0.3.0", "file")
    assert resolved.sha256 == sha(data) and resolved.card["task"] == "segment"


def test_pickle_files_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(Med3DFMError, match="refusing to load model.pt"):
        resolve_model(str(pickled))
    with pytest.raises(Med3DFMError, match="refusing to load model.pt"):
        import_model(pickled)
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    with pytest.raises(Med3DFMError, match="not a valid safetensors"):
        import_model(renamed)
    assert not (models_home() / "models").exists()


def test_adapter_encoder_check() -> None:
    card = {"id": "liver-adapter", "task": "adapter", "encoder": {"id": "med3dfm-base", "sha256": "a" * 64}}
    check_adapter_encoder(card, "a" * 64)
    with pytest.raises(Med3DFMError) as info:
        check_adapter_encoder(card, "b" * 64)
    message = str(info.value)
    assert "liver-adapter" in message and "med3dfm-base" in message and "a" * 64 in message and "b" * 64 in message


# --- import / remove / verify ------------------------------------------------------------------------

def test_import_safetensors_file(tmp_path: Path) -> None:
    data = make_weights(tmp_path / "offline.safetensors", "offline-model", "2.1.0")
    [installed] = import_model(tmp_path / "offline.safetensors")
    assert installed.weights == cache_folder("offline-model", "2.1.0") / "offline-model.safetensors"
    assert installed.weights.read_bytes() == data
    resolved = resolve_model("offline-model", allow_download=False)
    assert (resolved.source, resolved.version, resolved.sha256) == ("cache", "2.1.0", sha(data))
    row = next(r for r in list_models() if r["id"] == "offline-model")
    assert row["installed"] == "cache" and not row["in_registry"]
    assert all(c.ok for c in verify_model("offline-model"))


def test_import_file_for_registry_entry(tmp_path: Path) -> None:
    data = make_weights(tmp_path / "reg.safetensors", "reg-model")
    registry = write_registry(tmp_path / "r.json", [entry("reg-model", "1.0.0", [
        file_entry("official-name.safetensors", data, ["http://127.0.0.1:9/unreachable"])])])
    [installed] = import_model(tmp_path / "reg.safetensors", registry=registry)
    assert installed.weights.name == "official-name.safetensors"
    assert resolve_model("reg-model", registry=registry, allow_download=False).source == "cache"
    other = make_weights(tmp_path / "other.safetensors", "reg-model", seed=5)
    assert other != data
    with pytest.raises(Med3DFMError, match="matches no file of that registry entry"):
        import_model(tmp_path / "other.safetensors", registry=registry)


def make_bundle(tmp_path: Path, name: str, sha_override: Optional[str] = None) -> Path:
    data = make_weights(tmp_path / "bundle-src.safetensors", "zipped-model", "1.2.3")
    files = [file_entry("zipped-model.safetensors", data, [])]
    if sha_override:
        files[0]["sha256"] = sha_override
    listing = {"schema_version": 1, "models": [entry("zipped-model", "1.2.3", files)]}
    bundle = tmp_path / name
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("models.json", json.dumps(listing))
        archive.writestr("zipped-model.safetensors", data)
    return bundle


def test_import_zip_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "bundle.zip")
    [installed] = import_model(bundle)
    assert installed.id == "zipped-model" and installed.version == "1.2.3"
    resolved = resolve_model("zipped-model@1.2.3", allow_download=False)
    assert resolved.source == "cache" and resolved.card["title"] == "zipped-model (test)"


def test_import_zip_bundle_with_bad_checksum(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "bad.zip", sha_override="0" * 64)
    with pytest.raises(Med3DFMError, match="does not match its entry .*nothing was installed"):
        import_model(bundle)
    folder = cache_folder("zipped-model", "1.2.3")
    assert [p.name for p in folder.iterdir()] == [".lock"]
    with pytest.raises(Med3DFMError, match="unknown model 'zipped-model'"):
        resolve_model("zipped-model", allow_download=False)


def test_import_refuses_other_files(tmp_path: Path) -> None:
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"not a model")
    with pytest.raises(Med3DFMError, match="expected a .safetensors model file or a .zip model bundle"):
        import_model(other)


def test_remove(tmp_path: Path) -> None:
    make_weights(tmp_path / "gone.safetensors", "removable", "1.0.0")
    import_model(tmp_path / "gone.safetensors")
    result = remove_model("removable")
    assert result.removed == [cache_folder("removable")]
    assert not (models_home() / "models" / "removable").exists()
    with pytest.raises(Med3DFMError, match="unknown model 'removable'"):
        remove_model("removable")


def test_remove_never_deletes_bundled(tmp_path: Path, resources: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_weights(tmp_path / "b.safetensors", "shipped")
    bundled = resources / "models" / "shipped.safetensors"
    bundled.write_bytes(data)
    registry = write_registry(tmp_path / "models.json", [entry("shipped", "1.0.0", [
        file_entry("shipped.safetensors", data, [], bundled="models/shipped.safetensors")])])
    with pytest.raises(Med3DFMError, match="bundled with Med3DFM .*never removed"):
        remove_model("shipped", registry=registry)
    assert models_main(["remove", "shipped", "--registry", registry]) == 1
    assert "never removed" in capsys.readouterr().err
    assert bundled.read_bytes() == data


def test_verify_detects_tampering(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_weights(tmp_path / "t.safetensors", "tampered", "1.0.0")
    [installed] = import_model(tmp_path / "t.safetensors")
    assert models_main(["verify", "tampered"]) == 0
    blob = bytearray(installed.weights.read_bytes())
    blob[-1] ^= 0xFF
    installed.weights.write_bytes(bytes(blob))
    checks = verify_model("tampered")
    assert len(checks) == 1 and not checks[0].ok and "mismatch" in checks[0].message
    capsys.readouterr()
    assert models_main(["verify", "tampered", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["ok"] is False
    with pytest.raises(Med3DFMError, match="cached copy"):
        resolve_model("tampered", allow_download=False)


def test_cli_list_json_and_download(tmp_path: Path, server: FileServer, capsys: pytest.CaptureFixture) -> None:
    model = served_model(tmp_path, server)
    assert models_main(["list", "--json", "--registry", model["registry"]]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["installed"] == "not installed"
    assert models_main(["--registry", model["registry"], "download", model["id"], "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["result"] == "installed" and lines[-1]["source"] == "download"
    assert any(line.get("stage") == "download" for line in lines)
    assert models_main(["list", "--registry", model["registry"]]) == 0
    out = capsys.readouterr().out
    assert "net-model" in out and "cache" in out and "CC0-1.0" in out


# --- samples and versions -----------------------------------------------------------------------

def _with_sample(tmp_path: Path, server: FileServer, data: bytes, registry_sha: Optional[str] = None) -> str:
    """A registry whose model names a sample scan served on 127.0.0.1."""
    weights = make_weights(tmp_path / "w.safetensors", "sampled")
    url = server.add("/samples/case_001.nii.gz", data)
    sample = {"url": url, "sha256": registry_sha or sha(data), "size": len(data), "description": "one test scan"}
    model = entry("sampled", "1.0.0", [file_entry("sampled.safetensors", weights, [server.url("/sampled.safetensors")])], sample=sample)
    return write_registry(tmp_path / "models.json", [model])


def test_a_sample_is_downloaded_only_when_asked_checked_and_cached(tmp_path: Path, server: FileServer, home: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    data = b"a sample scan" * 1000
    registry = _with_sample(tmp_path, server, data)
    assert models_main(["list", "--json", "--registry", registry]) == 0
    assert json.loads(capsys.readouterr().out)[0]["sample"]["description"] == "one test scan"
    assert server.requests_for("/samples/case_001.nii.gz") == []  # listing fetches nothing
    assert models_main(["sample", "sampled", "--registry", registry, "--progress", "none"]) == 0
    cached = Path(capsys.readouterr().out.strip())
    assert cached == home / "samples" / "sampled" / "1.0.0" / "case_001.nii.gz" and cached.read_bytes() == data
    copy = tmp_path / "copy.nii.gz"
    assert models_main(["sample", "sampled@1.0.0", "--output", str(copy), "--registry", registry, "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"result": "sample", "id": "sampled@1.0.0", "path": str(copy)} and copy.read_bytes() == data
    assert len(server.requests_for("/samples/case_001.nii.gz")) == 1  # the second came from the cache


def test_a_sample_with_the_wrong_checksum_leaves_nothing(tmp_path: Path, server: FileServer, home: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    registry = _with_sample(tmp_path, server, b"x" * 5000, registry_sha="e" * 64)
    assert models_main(["sample", "sampled", "--output", str(tmp_path / "c.nii.gz"), "--registry", registry, "--progress", "none"]) == 1
    error = capsys.readouterr().err
    assert "checksum mismatch" in error and "e" * 64 in error and error.count("\n") == 1
    assert sorted(p.name for p in (home / "samples").iterdir()) == [".lock"] and not (tmp_path / "c.nii.gz").exists()
    # a model without a sample says so
    assert models_main(["sample", "med3dfm-encoder-small", "--progress", "none"]) == 1
    assert "names no sample scan" in capsys.readouterr().err


def test_the_shipped_sample_scan_matches_its_checksum_and_reads_as_the_crop(tmp_path: Path, server: FileServer, home: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """hippocampus-mr-demo's sample: the bytes at its pinned-commit URL (a copy in Testing/Data, the
    same voxels as the test crop hippocampus_014) pass its sha256 and size, served on 127.0.0.1."""
    import numpy as np
    import SimpleITK as sitk

    shipped = next(m for m in json.loads((resources_dir() / "models.json").read_text())["models"] if m["id"] == "hippocampus-mr-demo")["sample"]
    assert shipped["url"].startswith("https://raw.githubusercontent.com/WisnuMulya/hippocampal-volume-quantification/45dbf14")
    data_dir = Path(__file__).resolve().parents[1] / "Data" / "hippocampus"
    data = (data_dir.parent / "samples" / "hippocampus_014.nii.gz").read_bytes()  # not in hippocampus/: folder scans read every file there
    weights = make_weights(tmp_path / "w.safetensors", "sampled")
    sample = {**shipped, "url": server.add("/pinned/hippocampus_014.nii.gz", data)}
    model = entry("sampled", "1.0.0", [file_entry("sampled.safetensors", weights, [server.url("/sampled.safetensors")])], sample=sample)
    registry = write_registry(tmp_path / "models.json", [model])
    assert models_main(["sample", "sampled", "--registry", registry, "--progress", "none"]) == 0
    cached = Path(capsys.readouterr().out.strip())
    sample_image = sitk.GetArrayFromImage(sitk.ReadImage(str(cached)))
    assert np.array_equal(sample_image, sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "images" / "hippocampus_014.nii.gz"))))


def test_old_versions_stay_listed_and_selectable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = make_weights(tmp_path / "old.safetensors", "versioned", "1.0.0", seed=1)
    new = make_weights(tmp_path / "new.safetensors", "versioned", "1.10.0", seed=2)
    registry = write_registry(tmp_path / "models.json", [
        entry("versioned", "1.0.0", [file_entry("versioned.safetensors", old, [], bundled="old.safetensors")]),
        entry("versioned", "1.10.0", [file_entry("versioned.safetensors", new, [], bundled="new.safetensors")]),
    ])
    assert models_main(["list", "--json", "--registry", registry]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["1.10.0"]  # newest by version, not by text
    assert models_main(["list", "--registry", registry]) == 0
    assert "1 older version(s) not shown: --all-versions" in capsys.readouterr().out
    assert models_main(["list", "--json", "--all-versions", "--registry", registry]) == 0
    assert sorted(r["version"] for r in json.loads(capsys.readouterr().out)) == ["1.0.0", "1.10.0"]
    from Med3DFMLib.registry.catalogue import read_catalogue
    from Med3DFMLib.registry.resolve import find_models

    assert find_models("versioned@1.0.0", read_catalogue(registry))[2][0].entry["version"] == "1.0.0"  # what --model ID@VERSION runs
