"""Pretraining: progressive exact-count block masks, the hierarchical decoder's loss, and a real
two-process torchrun (gloo, CPU) run that resumes from a checkpoint with identical results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from Med3DFMLib.models import VARIANTS, DualBranchEncoder
from Med3DFMLib.pretrain.data import Archive, build_archive, random_batch
from Med3DFMLib.pretrain.decoder import CONTENT_STD, MaskedVolumeModel, patchify, reconstruction_targets, sincos_positions
from Med3DFMLib.pretrain.masking import MaskSchedule, block_masks

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_grows_ratio_and_block():
    schedule = MaskSchedule(0.3, 0.8, 1, 3)
    assert schedule.at(0.0) == (0.3, 1)
    assert schedule.at(1.0) == (0.8, 3)
    ratios = [schedule.at(p / 10)[0] for p in range(11)]
    assert ratios == sorted(ratios)
    with pytest.raises(ValueError):
        MaskSchedule(0.8, 0.3)


@pytest.mark.parametrize("ratio, block", [(0.4, 1), (0.6, 2), (0.75, 3)])
def test_block_masks_hide_an_exact_count_in_blocks(ratio, block):
    generator = torch.Generator().manual_seed(0)
    masks = block_masks(6, (8, 8, 8), ratio, block, generator)
    assert masks.shape == (6, 512)
    assert (masks.sum(1) == round(ratio * 512)).all()
    if block > 1:
        # Blocks make hidden patches cluster: most hidden patches have a hidden neighbour along z.
        grid = masks.view(6, 8, 8, 8)
        neighbours = (grid[:, 1:] & grid[:, :-1]).sum() / grid[:, 1:].sum()
        assert neighbours > ratio + 0.1
    again = block_masks(6, (8, 8, 8), ratio, block, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_loss_counts_hidden_patches_only():
    torch.manual_seed(0)
    model = MaskedVolumeModel(DualBranchEncoder(VARIANTS["tiny"]), decoder_dim=32, decoder_depth=2, decoder_heads=2)
    volume = torch.randn(2, 1, 32, 32, 32)
    mask = torch.tensor([[True, False] * 4, [False, True] * 4])
    loss = model(volume, mask)
    loss.backward()
    assert loss.item() > 0
    assert model.decoder.blocks[0].cross_attn.in_proj_weight.grad.abs().sum() > 0
    assert model.encoder.graph.stages[0][0].graph.update.weight.grad.abs().sum() > 0
    # Changing a visible patch's target region must change the loss only through the encoder
    # input, never through the target: the target of visible patches is not scored.
    patches = patchify(volume, 16)
    assert patches.shape == (2, 8, 4096)
    assert torch.equal(patches[0, 0], volume[0, 0, :16, :16, :16].reshape(-1))
    assert torch.equal(patches[0, 1], volume[0, 0, :16, :16, 16:].reshape(-1))


def test_hidden_tokens_keep_their_position_in_the_encoder(monkeypatch):
    encoder = DualBranchEncoder(VARIANTS["tiny"])
    everything_hidden = torch.ones(1, 8, dtype=torch.bool)
    seen = []
    monkeypatch.setattr(encoder.blocks[0], "forward", lambda tokens: seen.append(tokens) or tokens)
    with torch.no_grad():
        encoder(torch.randn(1, 1, 32, 32, 32), everything_hidden)
        encoder(torch.randn(1, 1, 32, 32, 32), everything_hidden)
    tokens = seen[0][0]
    # every hidden patch is the mask token plus its own position: no two are alike ...
    assert torch.cdist(tokens, tokens).add(torch.eye(8)).min() > 0
    assert torch.allclose(tokens, encoder.mask_token[0] + encoder.patch_embed.position((2, 2, 2))[0])
    # ... and nothing of the hidden content leaks into them
    assert torch.equal(seen[0], seen[1])


def test_decoder_positions_fall_off_with_distance():
    grid = (4, 6, 8)
    positions = sincos_positions(grid, 192, torch.device("cpu"))
    assert positions.shape == (4 * 6 * 8, 192)
    similarity = positions @ positions[0]  # token (0, 0, 0) against tokens along x
    along_x = similarity[:8]
    assert (along_x[:-1] > along_x[1:]).all()
    assert len({tuple(row.tolist()) for row in positions}) == positions.shape[0]


def test_flat_patches_are_not_scored_and_targets_need_no_noise():
    volume = torch.zeros(1, 1, 32, 32, 32)
    volume[..., 16:] = torch.randn(1, 1, 32, 32, 16)  # patches with x ≥ 16 have content
    normalised, content = reconstruction_targets(volume, 16)
    assert content.tolist() == [[False, True] * 4]
    assert torch.equal(normalised[0, 0], torch.zeros(4096))  # flat: no blown-up noise
    assert abs(float(normalised[0, 1].std()) - 1.0) < 0.05
    # hidden patches that are all flat score nothing, so the loss is 0, not NaN
    torch.manual_seed(0)
    model = MaskedVolumeModel(DualBranchEncoder(VARIANTS["tiny"]), decoder_dim=32, decoder_depth=2, decoder_heads=2)
    flat_hidden = torch.tensor([[True, False] * 4])
    assert model(volume, flat_hidden).item() == 0.0
    noisy = volume + 0.1 * torch.randn_like(volume)
    textured_hidden = ~flat_hidden
    # the input noise changes the prediction, never the target: scoring `volume` ≠ scoring `noisy`
    assert model(noisy, textured_hidden, volume).item() != model(noisy, textured_hidden).item()
    assert CONTENT_STD > 0


def test_decoder_layers_read_several_encoder_depths():
    model = MaskedVolumeModel(DualBranchEncoder(VARIANTS["small"]), decoder_depth=4)
    assert model.decoder.sources == [1, 3, 5, 7]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "archive.npz"
    summary = build_archive([ROOT / "Testing" / "Data" / "hippocampus", ROOT / "Testing" / "Data" / "pyradiomics"], out, (2.0, 2.0, 2.0))
    # 3 hippocampus scans + the breast scan; their 4 label maps are recognised and skipped.
    assert summary["volumes"] == 4 and summary["skipped_label_maps"] == 4
    return out


def test_archive_round_trip_and_seeded_batches(archive):
    loaded = Archive.load(archive)
    assert len(loaded.volumes) == 4 and loaded.spacing == (2.0, 2.0, 2.0)
    a, a_clean = random_batch(loaded, 2, 32, torch.Generator().manual_seed(5), torch.device("cpu"))
    b, b_clean = random_batch(loaded, 2, 32, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert a.shape == a_clean.shape == (2, 1, 32, 32, 32) and torch.equal(a, b) and torch.equal(a_clean, b_clean)
    assert float(a.std()) > 0.1
    # inputs are the targets plus the noise augmentation (at most 0.1 standard deviations)
    assert 0 <= float((a - a_clean).std()) <= 0.11
    # sampling follows the content a crop can hold: a scan smaller than the window counts by its size
    weights = loaded.weights(32)
    sizes = np.array([min(v.size, 32**3) for v in loaded.volumes], dtype=float)
    assert np.allclose(weights, sizes / sizes.sum())


def _torchrun(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "Med3DFMLib.cli", "pretrain", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_gloo_run_resumes_identically(archive, tmp_path):
    common = ["--data", str(archive), "--max-steps", "4", "--batch", "1", "--window", "32", "--variant", "tiny", "--checkpoint-every", "2", "--progress", "none", "--lr", "1e-3"]
    full = tmp_path / "full"
    _torchrun([*common, "--output", str(full)], tmp_path)
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [4] or log[-1]["step"] == 4
    assert (full / "checkpoints" / "step_0000002" / "state.json").is_file()
    card_encoder = load_file(str(full / "encoder.safetensors"))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    _torchrun([*common, "--output", str(resumed), "--resume"], tmp_path)
    resumed_encoder = load_file(str(resumed / "encoder.safetensors"))
    assert card_encoder.keys() == resumed_encoder.keys()
    for name in card_encoder:
        assert torch.equal(card_encoder[name], resumed_encoder[name]), name
    final = load_file(str(full / "checkpoints" / "step_0000004" / "model.safetensors"))
    resumed_final = load_file(str(resumed / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert all(torch.equal(final[k], resumed_final[k]) for k in final)  # full precision, decoder too
    # and training did move the weights away from the step-2 state
    step2 = load_file(str(full / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any(not torch.equal(step2[k], v) for k, v in final.items())
    from Med3DFMLib.weights import read_weights

    _, card = read_weights(full / "encoder.safetensors")
    assert card["task"] == "encoder" and card["training"]["summary"]["world_size"] == 2
    assert np.isfinite(card["training"]["summary"]["final_loss"])


def test_target_diagnosis_on_real_scans(archive, tmp_path):
    """scripts/diagnose_pretraining_targets.py: oracles that know more of a hidden patch score
    lower, and the learnable gap (zero loss − oracle) is wider with the current target rule."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import diagnose_pretraining_targets as diagnosis

    assert diagnosis.main(["--archive", str(archive), "--window", "32", "--crops", "8", "--block", "1", "--mask-ratio", "0.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pretraining_targets.json").read_text())
    for rule in ("before", "now"):
        row = result["targets"][rule]
        assert row["zero"] > row["oracle_2"] > row["oracle_4"] > row["oracle_8"] >= 0.0
    before, now = result["targets"]["before"], result["targets"]["now"]
    assert now["zero"] - now["oracle_4"] > before["zero"] - before["oracle_4"]
    assert "| now: clean targets" in (tmp_path / "pretraining_targets.md").read_text()
