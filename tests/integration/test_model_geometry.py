"""The overlap knob reaches the model: views, PE, stitched sequence length and VICReg pairs all follow it.

Built through the real path (``build_stage`` -> backbones from disk -> PanoVLM) with the tiny SigLIP (64 px, 8x8
patches) and an MLP resampler pooling 2x2, so each view hands 4x4 = 16 tokens to the LM.
"""

from __future__ import annotations

import math

import pytest
import torch

from panobench.errors import ConfigError, TrainingError
from panobench.geometry.rays import half_patch_angle, yaw_pitch_to_rays
from panobench.models.pe import TokenLayout, pe_features
from panobench.training.builder import build_stage
from panobench.training.runner import train_stage
from panobench.training.system import PanoVLMSystem

TOKENS_PER_VIEW = 16  # (8 / 2)^2


def _model(cfg_factory, stage: str = "resampler", **overrides):
    return build_stage(cfg_factory(**overrides), stage).system.model


def _pe_at(model, yaw: list[float], pitch: list[float], is_global: bool = False) -> torch.Tensor:
    """The model's PE module evaluated at arbitrary rays: [len(yaw), D]."""
    n = len(yaw)
    layout = TokenLayout(yaw=torch.tensor([yaw]), pitch=torch.tensor([pitch]), is_global=torch.tensor([is_global]),
                         keep=torch.ones(1, n, dtype=torch.bool))
    with torch.no_grad():
        return model.pe.proj(pe_features(layout, model.cfg.pe))[0]


@pytest.mark.parametrize(("overlap", "views", "concat", "dedupe"), [
    (0.0, 5, 5 * TOKENS_PER_VIEW, 5 * TOKENS_PER_VIEW),
    # 8 tiles 45 deg apart: each keeps the 2 central columns x 4 rows its axis is nearest to, + 16 global tokens.
    (0.5, 9, 9 * TOKENS_PER_VIEW, 8 * 8 + TOKENS_PER_VIEW),
])
def test_overlap_sets_views_and_stitched_length(cfg_factory, overlap, views, concat, dedupe):
    erp = torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8)
    for stitching, expected in (("concat", concat), ("dedupe", dedupe)):
        model = _model(cfg_factory, geometry={"overlap": overlap}, stitching=stitching)
        desc = model.describe()
        assert (model.num_views, desc["num_views"], desc["num_tiles"]) == (views, views, views - 1)
        assert model.num_visual_tokens == expected == desc["visual_tokens_per_sample"]
        with torch.no_grad():
            assert tuple(model.encode_images(erp).shape) == (2, expected, model.lm.config.hidden_size)
            assert tuple(model.vision_tokens(erp).shape) == (2, views, 64, 64)


def test_pe_follows_the_tile_plan(cfg_factory):
    m0 = _model(cfg_factory, geometry={"overlap": 0.0})
    m5 = _model(cfg_factory, geometry={"overlap": 0.5})
    assert m0.pe.features.shape[:2] == (5, TOKENS_PER_VIEW)
    assert m5.pe.features.shape[:2] == (9, TOKENS_PER_VIEW)
    # Tile 1 looks at yaw 90 deg at overlap 0 and at 45 deg at overlap 0.5: its token rays and PE differ.
    assert m0.layout.yaw[1].mean().item() == pytest.approx(math.pi / 2, abs=1e-5)
    assert m5.layout.yaw[1].mean().item() == pytest.approx(math.pi / 4, abs=1e-5)
    assert not torch.allclose(m0.pe.features[1], m5.pe.features[1])
    # Same seed, same PE weights: a difference in the PE values comes from the geometry alone.
    torch.testing.assert_close(m0.pe.proj.weight, m5.pe.proj.weight)
    with torch.no_grad():
        assert not torch.allclose(m0.pe()[1], m5.pe()[1])
        # Tile 0 (yaw 0) is the same camera in both plans: identical PE.
        torch.testing.assert_close(m0.pe()[0], m5.pe()[0])


def test_pe_same_ray_same_value_continuous_at_seam_and_global_distinct(cfg_factory):
    model = _model(cfg_factory, geometry={"overlap": 0.5})
    with torch.no_grad():
        model.pe.proj.weight.normal_()  # O(1) weights, so differences are far above float noise
    # The same ray reached as yaw +pi and -pi (both sides of the ERP seam): identical PE.
    same = _pe_at(model, [math.pi, -math.pi], [0.3, 0.3])
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=0)
    # Continuity across the seam: a small step over +-pi moves the PE as little as a small step elsewhere.
    d = 1e-3
    seam = _pe_at(model, [math.pi - d, -math.pi + d], [0.0, 0.0])
    inner = _pe_at(model, [0.5 - d, 0.5 + d], [0.0, 0.0])
    far = _pe_at(model, [0.0, math.pi], [0.0, 0.0])
    seam_step = (seam[0] - seam[1]).norm()
    assert seam_step < 5 * (inner[0] - inner[1]).norm() + 1e-6
    assert seam_step < 1e-2 * (far[0] - far[1]).norm()
    # Global view: same ray, different PE (the flag feature).
    tile = _pe_at(model, [0.2], [0.1], is_global=False)
    glob = _pe_at(model, [0.2], [0.1], is_global=True)
    assert (tile - glob).norm() > 0.1 * tile.norm()
    # In the model's own layout the global view's rows carry the flag and no tile row does.
    flags = model.pe.features[..., -1]
    assert flags[-1].eq(1).all() and flags[:-1].eq(0).all()


def test_pe_identical_for_coinciding_rays_of_two_tiles(cfg_factory):
    """PE is a function of the token's ray: tokens of neighbouring tiles that look the same way get (nearly) the
    same PE, however far apart their positions in the two tiles' grids are."""
    system = build_stage(cfg_factory(geometry={"overlap": 0.5}), "vision").system
    model = system.model
    with torch.no_grad():
        model.pe.proj.weight.normal_()
        pe = model.pe().flatten(0, 1)                                  # [V*16, D]
    # An exactly coinciding ray, seen from tile 0 and from tile 1: the same PE.
    ray_yaw, ray_pitch = float(model.layout.yaw[0, 3]), float(model.layout.pitch[0, 3])
    same = _pe_at(model, [ray_yaw, ray_yaw], [ray_pitch, ray_pitch])
    torch.testing.assert_close(same[0], same[1])
    # Geometric correspondences (rays within half a patch) vs all token pairs of the same two tiles.
    ia, ib = system.vicreg_index_a, system.vicreg_index_b
    matched = (pe[ia] - pe[ib]).norm(dim=-1)
    n = TOKENS_PER_VIEW
    tile0, tile1 = pe[:n], pe[n:2 * n]
    any_pair = (tile0[:, None] - tile1[None, :]).norm(dim=-1)
    assert matched.max() < 0.5 * any_pair.median()
    # Index-wise (the original code's strip matching) the tokens are not the corresponding ones.
    assert not torch.equal(ia % n, ib % n)


def _vicreg_pairs(cfg_factory, overlap: float, resampler: str = "mlp") -> PanoVLMSystem:
    return build_stage(cfg_factory(geometry={"overlap": overlap}, resampler={"type": resampler}), "vision").system


def test_vicreg_pairs_follow_overlap_and_geometry(cfg_factory):
    counts = {}
    for overlap in (0.25, 0.5):
        system = _vicreg_pairs(cfg_factory, overlap)
        counts[overlap] = system.num_vicreg_pairs
        model = system.model
        n = TOKENS_PER_VIEW
        va, ia = system.vicreg_index_a // n, system.vicreg_index_a % n
        vb, ib = system.vicreg_index_b // n, system.vicreg_index_b % n
        tiles = model.plan.num_tiles
        assert (va != vb).all() and (va < tiles).all() and (vb < tiles).all()   # never the global view
        # Neighbours only (yaw order is a ring).
        assert (((vb - va) % tiles == 1) | ((va - vb) % tiles == 1)).all()
        # Each pair looks in the same direction, within half a (pooled) patch.
        ra = yaw_pitch_to_rays(model.layout.yaw[va, ia].double(), model.layout.pitch[va, ia].double())
        rb = yaw_pitch_to_rays(model.layout.yaw[vb, ib].double(), model.layout.pitch[vb, ib].double())
        angle = torch.arccos((ra * rb).sum(-1).clamp(-1, 1))
        assert angle.max() <= half_patch_angle(90.0, 4) + 1e-3
    assert 0 < counts[0.25] < counts[0.5]
    # A query resampler pairs SigLIP tokens (8x8 grid) instead: more, finer pairs.
    assert _vicreg_pairs(cfg_factory, 0.5, "qformer").num_vicreg_pairs > counts[0.5]


def test_vision_stage_at_overlap_zero_is_a_clear_error(cfg_factory):
    cfg = cfg_factory(geometry={"overlap": 0.0})
    with pytest.raises(TrainingError, match="overlap"):
        build_stage(cfg, "vision")
    with pytest.raises(ConfigError, match=r"stage 'vision'.*overlap"):
        train_stage(cfg, "vision")


def test_merge_puts_vision_tokens_at_each_rows_placeholder(cfg_factory):
    """The batched merge equals the obvious per-row concatenation, wherever the placeholder sits."""
    from panobench.models.vlm import IGNORE_INDEX

    model = _model(cfg_factory)
    b, length, t, d = 4, 10, 6, model.lm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (b, length), generator=g)
    ids[ids == model.placeholder_id] = 5
    positions = [0, 4, length - 1, 2]
    for i, p in enumerate(positions):
        ids[i, p] = model.placeholder_id
    mask = torch.randint(0, 2, (b, length), generator=g)
    labels = torch.randint(0, 300, (b, length), generator=g)
    vision = torch.randn(b, t, d, generator=g)
    with torch.no_grad():
        embeds, merged_mask, merged_labels = model._merge(ids, mask, vision, labels)
        text = model.lm.get_input_embeddings()(ids.masked_fill(ids == model.placeholder_id, model.pad_id))
    assert embeds.shape == (b, length - 1 + t, d)
    for i, p in enumerate(positions):
        torch.testing.assert_close(embeds[i], torch.cat([text[i, :p], vision[i], text[i, p + 1:]]), rtol=0, atol=0)
        assert torch.equal(merged_mask[i], torch.cat([mask[i, :p], torch.ones(t, dtype=mask.dtype), mask[i, p + 1:]]))
        assert torch.equal(merged_labels[i], torch.cat([labels[i, :p], torch.full((t,), IGNORE_INDEX),
                                                        labels[i, p + 1:]]))
    ids[0, 1] = model.placeholder_id     # two placeholders in one row: refused
    with pytest.raises(ValueError, match="exactly one vision placeholder"):
        model._merge(ids, mask, vision, labels)
