"""A model whose licence restricts use runs only after it was acknowledged once (remembered per model
and licence), on the command line with --accept-licence; unrestricted models never ask."""

from __future__ import annotations

import json

import pytest

from Med3DFMLib.cli import main
from Med3DFMLib.registry import licences


@pytest.mark.parametrize("card, expected", [
    ({"licence": "CC-BY-NC-4.0"}, "non-commercial use only"),
    ({"licence": "CC-BY-NC-SA-4.0"}, "non-commercial use only"),
    ({"licence": "Non-commercial research licence"}, "non-commercial use only"),
    ({"licence": "for research use only"}, "research use only"),
    ({"licence": "Academic Free"}, "academic use only"),
    ({"licence": "CC-BY-SA-4.0"}, None),
    ({"licence": "Apache-2.0"}, None),
    ({"licence": "NCSA"}, None),  # the University of Illinois/NCSA licence is permissive
    ({"licence": "MIT", "use_restrictions": "not for clinical use"}, "not for clinical use"),
    ({}, None),
])
def test_what_a_licence_restricts(card, expected):
    assert licences.restriction(card) == expected


@pytest.fixture()
def restricted_model(tmp_path):
    """The demo model's weights with a non-commercial licence in their card."""
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights, write_weights

    tensors, card = read_weights(resolve_model("hippocampus-mr-demo").weights)
    path = tmp_path / "nc-model.safetensors"
    write_weights(path, tensors, {**card, "id": "hippocampus-nc-test", "licence": "CC-BY-NC-4.0"})
    return path


def test_a_restricted_model_asks_once_and_remembers(tmp_path, hippocampus_case, restricted_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    command = ["segment", str(hippocampus_case[0]), "--model", str(restricted_model), "--progress", "none"]
    assert main(command + ["-o", str(out / "a.seg.nrrd")]) == 1
    error = capsys.readouterr().err
    assert "CC-BY-NC-4.0 (non-commercial use only)" in error and "--accept-licence" in error
    assert list(out.iterdir()) == []  # refused before anything was written
    assert main(command + ["-o", str(out / "b.seg.nrrd"), "--accept-licence"]) == 0
    record = json.loads((out / "b.json").read_text())
    assert record["licence"] == {"licence": "CC-BY-NC-4.0", "restriction": "non-commercial use only", "acknowledged": True}
    assert main(command + ["-o", str(out / "c.seg.nrrd")]) == 0  # remembered
    stored = json.loads((licences.models_home() / licences.FILE).read_text())
    assert stored["hippocampus-nc-test"]["restriction"] == "non-commercial use only"


def test_a_changed_licence_asks_again_and_a_free_one_never(tmp_path):
    card = {"id": "m", "licence": "CC-BY-NC-4.0"}
    with pytest.raises(Exception, match="--accept-licence"):
        licences.require(card, home=tmp_path)
    assert licences.require(card, accept=True, home=tmp_path) == "non-commercial use only"
    assert licences.is_acknowledged(card, tmp_path)
    assert not licences.is_acknowledged({**card, "licence": "CC-BY-NC-ND-4.0"}, tmp_path)
    assert licences.is_acknowledged({"id": "free", "licence": "Apache-2.0"}, tmp_path)
    (tmp_path / licences.FILE).write_text("not json")
    assert not licences.is_acknowledged(card, tmp_path)  # unreadable: ask again


def test_a_batch_with_a_restricted_model_needs_the_acknowledgement_too(tmp_path, hippocampus_case, restricted_model):
    listing = tmp_path / "scans.csv"
    listing.write_text(f"input\n{hippocampus_case[0]}\n")
    command = ["segment", "--list", str(listing), "--model", str(restricted_model), "--progress", "none"]
    assert main(command + ["--output-dir", str(tmp_path / "a")]) == 3  # the scan failed, with the licence line
    summary = (tmp_path / "a" / "summary.tsv").read_text()
    assert "failed" in summary and "--accept-licence" in summary
    assert main(command + ["--output-dir", str(tmp_path / "b"), "--accept-licence"]) == 0
    assert "\tdone\t" in (tmp_path / "b" / "summary.tsv").read_text()


def test_classify_explain_and_adapt_check_the_licence_too(tmp_path, hippocampus_case, restricted_model, capsys, monkeypatch):
    """The same line, before any work, for a restricted model given to explain and classify, and for a
    restricted encoder that adapt would train on (an adapter made on it inherits its terms)."""
    image = str(hippocampus_case[0])
    runs = {
        "explain": ["explain", image, "--model", str(restricted_model), "--target", "anterior hippocampus", "-o", str(tmp_path / "h.nrrd")],
        "classify": ["classify", image, "--model", str(restricted_model), "-o", str(tmp_path / "c.tsv")],
        "adapt": ["adapt", "--image", image, "--labels", str(hippocampus_case[1]), "--name", "x", "-o", str(tmp_path / "x.safetensors"),
                  "--encoder", str(restricted_model)],
    }
    for name, argv in runs.items():
        assert main(argv + ["--progress", "none"]) == 1, name
        error = capsys.readouterr().err
        assert "CC-BY-NC-4.0 (non-commercial use only)" in error and "--accept-licence" in error, (name, error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nc-model.safetensors"]  # nothing was written
    # an adapter is bound by its encoder's licence: acknowledging the encoder once covers it
    adapter = {"id": "an-adapter", "task": "adapter", "encoder": {"id": "nc-encoder", "sha256": "0" * 64}}
    encoder = {"id": "nc-encoder", "licence": "CC-BY-NC-4.0"}
    monkeypatch.setattr(licences, "_card_of", lambda spec, registry: {"an-adapter": adapter, "nc-encoder": encoder}.get(spec))
    assert licences.cards_for("an-adapter") == [adapter, encoder]
    with pytest.raises(Exception, match="nc-encoder is licensed CC-BY-NC-4.0"):
        licences.require_for("an-adapter")
    assert licences.require_for("an-adapter", accept=True) == ["non-commercial use only"] and licences.require_for("an-adapter") == ["non-commercial use only"]
