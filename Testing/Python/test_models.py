"""The dual-branch encoder: shapes, gradient flow to both branches, exact zero-offset sampling,
no leakage of visible context into masked patches, and the task heads."""

from __future__ import annotations

import pytest
import torch

from Med3DFMLib.models import VARIANTS, DualBranchEncoder, EncoderConfig, SegmentationModel, TaskQueryClassifier
from Med3DFMLib.models import fusion
from Med3DFMLib.models.fusion import PLANE_AXES, CrossPlanarDeformableAttention, reference_points, sample_in_planes

def sample_points(values, points):
    """The reference: trilinear samples of `values` (B, C, d, h, w) at `points` (B, N, P, 3) by 3D
    grid_sample (border-clamped, align_corners=False), (B, C, N, P)."""
    sampled = torch.nn.functional.grid_sample(values, points.unsqueeze(3), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.squeeze(-1)


SMALL = EncoderConfig(embed_dim=48, depth=2, num_heads=2, graph_channels=(8, 16, 24), graph_depths=(1, 1, 1), fusion_after=(0, 1), stem_channels=8)


@pytest.mark.parametrize("size", [(32, 32, 32), (48, 32, 64)])
def test_encoder_pyramid_shapes(size):
    encoder = DualBranchEncoder(SMALL).eval()
    out = encoder(torch.randn(2, 1, *size))
    strides = (2, 4, 8, 16)
    for feature, stride, channels in zip(out.pyramid, strides, encoder.channels):
        assert feature.shape == (2, channels, *(s // stride for s in size))
    assert out.token_grid == tuple(s // 16 for s in size)
    assert out.tokens.shape == (2, (size[0] // 16) * (size[1] // 16) * (size[2] // 16), SMALL.embed_dim)
    assert len(out.vit_layers) == SMALL.depth


def test_default_encoder_on_a_96_window():
    model = SegmentationModel(VARIANTS["small"], num_classes=4).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 96, 96, 96))
    assert logits.shape == (1, 4, 96, 96, 96)
    assert sum(p.numel() for p in model.parameters()) < 8_000_000


def test_input_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        DualBranchEncoder(SMALL)(torch.randn(1, 1, 40, 32, 32))


def test_gradients_reach_both_branches_and_the_fusion():
    model = SegmentationModel(SMALL, num_classes=3)
    x = torch.randn(2, 1, 32, 32, 32)
    target = torch.randint(0, 3, (2, 32, 32, 32))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    # Zero-initialised offset/weight layers get gradients only after a step; check the rest.
    groups = {
        "vit": model.encoder.blocks[0].attn.qkv.weight,
        "patch_embed": model.encoder.patch_embed.proj.weight,
        "graph": model.encoder.graph.stages[0][0].graph.update.weight,
        "graph_aggregate": model.encoder.graph.stages[2][0].graph.aggregate.weight,
        "stem": model.encoder.stem.conv1[0].weight,
        "local_to_global": model.encoder.local_to_global[0].values[0].weight,
        "local_to_global_offsets": model.encoder.local_to_global[0].offsets.weight,
        "global_to_local": model.encoder.global_to_local[0].out.weight,
    }
    for name, param in groups.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_zero_offsets_sample_exactly_at_the_reference_grid():
    torch.manual_seed(0)
    values = torch.randn(1, 6, 4, 5, 6)
    ref = reference_points((4, 5, 6), values.device)
    sampled = sample_points(values, ref.view(1, -1, 1, 3))[..., 0]
    assert torch.allclose(sampled, values.flatten(2), atol=1e-6)
    attention = CrossPlanarDeformableAttention(query_dim=12, value_dims=[6, 6], dim=12, points=3)
    queries = torch.randn(1, ref.shape[0], 12)
    locations = attention.sampling_locations(queries, ref, [(4, 5, 6), (2, 3, 3)])
    assert torch.equal(locations, ref.view(1, -1, 1, 1, 1, 3).expand_as(locations))


def test_offsets_move_only_within_each_plane():
    attention = CrossPlanarDeformableAttention(query_dim=12, value_dims=[6], dim=12, points=2)
    torch.nn.init.normal_(attention.offsets.weight)
    ref = reference_points((4, 4, 4), torch.device("cpu"))
    moved = attention.sampling_locations(torch.randn(1, ref.shape[0], 12), ref, [(4, 4, 4)]) - ref.view(1, -1, 1, 1, 1, 3)
    fixed_axis = {0: 2, 1: 1, 2: 0}  # axial keeps z, coronal keeps y, sagittal keeps x
    for group, axis in fixed_axis.items():
        assert torch.all(moved[:, :, group, ..., axis] == 0)
        assert moved[:, :, group].abs().sum() > 0


@pytest.mark.parametrize("grid, map_size", [((6, 5, 4), (3, 4, 2)), ((3, 4, 5), (7, 6, 9))])
def test_per_plane_sampling_equals_trilinear_sampling(grid, map_size):
    """The fast path samples the same numbers as 3D grid_sample, also past the border (clamped)."""
    torch.manual_seed(0)
    values = torch.randn(2, 8, *map_size)
    ref = reference_points(grid, values.device)
    for axes in PLANE_AXES:
        offsets = torch.zeros(2, ref.shape[0], 4, 3)
        offsets[..., list(axes)] = torch.randn(2, ref.shape[0], 4, 2)  # some points leave the map
        points = ref.view(1, -1, 1, 3) + offsets
        fast = sample_in_planes(values, points, grid, normal=3 - sum(axes))
        reference = sample_points(values, points)
        assert torch.allclose(fast, reference, atol=1e-5)
        # the weighted sum over each query's points, taken inside the sampler
        weights = torch.rand(2, ref.shape[0], 4)
        mixed = sample_in_planes(values, points, grid, normal=3 - sum(axes), weights=weights)
        assert torch.allclose(mixed, (reference * weights.unsqueeze(1)).sum(-1), atol=1e-5)


def test_encoder_gives_the_same_features_with_either_sampler(monkeypatch):
    torch.manual_seed(0)
    encoder = DualBranchEncoder(SMALL).eval()
    for module in [*encoder.local_to_global, *encoder.global_to_local]:
        torch.nn.init.normal_(module.offsets.weight, std=0.5)  # trained offsets are not zero
        torch.nn.init.normal_(module.weights.weight)
    x = torch.randn(1, 1, 32, 48, 64)
    with torch.no_grad():
        fast = encoder(x)
        monkeypatch.setattr(fusion, "sample_in_planes", lambda values, points, grid, normal, weights: (sample_points(values, points) * weights.unsqueeze(1)).sum(-1))
        plain = encoder(x)
    for a, b in zip(fast.pyramid, plain.pyramid):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(fast.tokens, plain.tokens, atol=1e-4)


def test_masked_patches_receive_no_visible_context():
    """Changing the voxels of hidden patches must not change any output: nothing of them leaks."""
    torch.manual_seed(0)
    encoder = DualBranchEncoder(SMALL).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    mask = torch.tensor([[True, False, False, True, False, True, True, False]])
    hidden_changed = x.clone()
    hidden_changed[..., :16, :16, :16] += 5.0  # token 0 (hidden)
    visible_changed = x.clone()
    visible_changed[..., 16:, 16:, 16:] -= 3.0  # token 7 (visible): outputs must react to this
    with torch.no_grad():
        a, b, c = encoder(x, mask), encoder(visible_changed, mask), encoder(hidden_changed, mask)
    assert not torch.allclose(a.tokens, b.tokens)
    assert torch.allclose(a.tokens, c.tokens) and all(torch.allclose(p, q) for p, q in zip(a.pyramid, c.pyramid))
    # Graph features inside hidden patches are exactly zero before fusion reads them.
    graph_maps = encoder.graph(encoder.stem(x * 0)[1], (~mask).view(1, 1, 2, 2, 2))
    assert all(m[..., : m.shape[2] // 2, : m.shape[3] // 2, : m.shape[4] // 2].abs().sum() == 0 for m in graph_maps)


def test_task_query_classifier_pools_with_a_heatmap():
    head = TaskQueryClassifier(in_dim=24, num_classes=3, num_queries=2, dim=16)
    logits, attention = head(torch.randn(2, 24, 3, 4, 5))
    assert logits.shape == (2, 3)
    assert attention.shape == (2, 2, 3, 4, 5)
    assert torch.allclose(attention.flatten(2).sum(-1), torch.ones(2, 2))


def test_config_round_trip_and_variants():
    assert EncoderConfig.from_dict(SMALL.to_dict()) == SMALL
    base = DualBranchEncoder(VARIANTS["base"])
    small = DualBranchEncoder(VARIANTS["small"])
    assert sum(p.numel() for p in base.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="unknown encoder settings"):
        EncoderConfig.from_dict({"embed_dims": 10})
