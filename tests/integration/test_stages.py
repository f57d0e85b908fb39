"""Each stage trains exactly its declared set, the set is recorded, and the loss goes down for every resampler."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from panobench.models.assembly import compile_blocks
from panobench.stages import component_of
from panobench.training.builder import build_stage
from panobench.training.datamodule import PanoDataModule
from panobench.utils.io import read_json

VISION_LAYERS = "model.vision.model.encoder.layers."  # SiglipVisionModel under transformers 5


def _batch(built: Any, cfg: Any, stage: str, size: int = 4) -> dict[str, torch.Tensor]:
    data = PanoDataModule(cfg, stage, built.prompts, built.system.model.pad_id)
    data.setup()
    return data.collate([data.train_set[i] for i in range(size)])


def _backward(built: Any, cfg: Any, stage: str) -> dict[str, torch.nn.Parameter]:
    system = built.system
    system.zero_grad(set_to_none=True)
    system.compute_loss(_batch(built, cfg, stage)).backward()
    return dict(system.named_parameters())


def _nonzero(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_resampler_stage_freezes_lm_and_vision(cfg_factory):
    cfg = cfg_factory()
    built = build_stage(cfg, "resampler")
    params = _backward(built, cfg, "resampler")
    by_comp: dict[str, list[str]] = {}
    for name, p in params.items():
        by_comp.setdefault(component_of(name), []).append(name)
        if component_of(name) in ("lm", "vision"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and _nonzero(p), name
    assert set(by_comp) == {"lm", "vision", "resampler", "projector", "pe"}
    counts = built.param_counts
    assert counts["lm"][0] == 0 < counts["lm"][1]
    assert counts["vision"][0] == 0 < counts["vision"][1]
    for comp in ("resampler", "projector", "pe"):
        assert counts[comp][0] == counts[comp][1] > 0


def test_finetune_stage_trains_lora_not_base_lm(trained_cell):
    cfg = trained_cell.cfg
    built = build_stage(cfg, "finetune")
    system = built.system
    optimizer = system.configure_optimizers()["optimizer"]
    lora = {n: p for n, p in system.named_parameters() if component_of(n) == "lora"}
    base = {n: p for n, p in system.named_parameters() if component_of(n) == "lm"}
    assert lora and base and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for p in base.values())
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    base_before = {n: p.detach().clone() for n, p in base.items()}

    params = _backward(built, cfg, "finetune")
    # LoRA B starts at zero, so only B has a gradient on the first step (A's gradient is B^T-weighted).
    lora_b = [n for n in lora if "lora_B" in n]
    assert lora_b and all(_nonzero(params[n]) for n in lora_b)
    assert all(params[n].grad is None for n in base)
    assert all(params[n].grad is None for n in params if component_of(n) == "vision")
    optimizer.step()
    assert all(not torch.equal(lora[n], lora_before[n]) for n in lora_b)
    assert all(torch.equal(base[n], base_before[n]) for n in base)

    params = _backward(built, cfg, "finetune")
    assert all(_nonzero(params[n]) for n in lora)               # now A as well
    optimizer.step()
    assert all(not torch.equal(lora[n], lora_before[n]) for n in lora)
    assert all(torch.equal(base[n], base_before[n]) for n in base)


@pytest.mark.parametrize("resampler", ["mlp", "qformer"])
def test_vision_stage_trains_last_blocks_resampler_and_vicreg_head(cfg_factory, resampler):
    cfg = cfg_factory(resampler={"type": resampler}, vision={"trainable_blocks": 1})
    built = build_stage(cfg, "vision")
    params = _backward(built, cfg, "vision")
    last = built.system.model.vision.num_layers - 1
    expected = {n for n in params if n.startswith((f"{VISION_LAYERS}{last}.", "model.vision.model.post_layernorm."))
                or n.startswith("vicreg_projector.")}
    if resampler == "mlp":      # grid resampler: VICReg pairs its output tokens, so it is trained too
        expected |= {n for n in params if component_of(n) == "resampler"}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == expected
    assert any(n.startswith(f"{VISION_LAYERS}{last}.") for n in trainable)
    for name, p in params.items():
        if name in expected:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(_nonzero(params[n]) for n in expected if n.startswith(VISION_LAYERS))
    assert all(params[n].grad is None for n in params if n.startswith(f"{VISION_LAYERS}0."))


def test_trainable_counts_are_recorded(trained_cell):
    cells = {"vision": (trained_cell.vision_cfg, trained_cell.vision_dir),
             "resampler": (trained_cell.cfg, trained_cell.resampler_dir),
             "finetune": (trained_cell.cfg, trained_cell.finetune_dir)}
    for stage, (cfg, run_dir) in cells.items():
        system = build_stage(cfg, stage).system
        expected: dict[str, list[int]] = {}
        for name, p in system.named_parameters():
            t, total = expected.setdefault(component_of(name), [0, 0])
            expected[component_of(name)] = [t + (p.numel() if p.requires_grad else 0), total + p.numel()]
        meta = read_json(run_dir / "checkpoint_metadata.json")
        record = read_json(run_dir / "measurements.json")
        assert meta["trainable_params"] == {k: v[0] for k, v in expected.items()}, stage
        assert meta["total_params"] == {k: v[1] for k, v in expected.items()}, stage
        assert record["params"]["by_component"] == expected, stage
        assert record["params"]["trainable"] == sum(v[0] for v in expected.values()) > 0
        assert expected["lm"][0] == 0
    ft = read_json(trained_cell.finetune_dir / "measurements.json")["params"]["by_component"]
    assert ft["lora"][0] == ft["lora"][1] > 0
    vis = read_json(trained_cell.vision_dir / "measurements.json")["params"]["by_component"]
    assert 0 < vis["vision"][0] < vis["vision"][1]


@pytest.mark.parametrize("resampler", ["mlp", "bimamba", "qformer", "perceiver"])
def test_loss_decreases_on_a_fixed_batch(cfg_factory, resampler):
    """Stage 2 (frozen random LM): 15 AdamW steps at a high LR on one batch; overlap 0 keeps it to 5 views."""
    cfg = cfg_factory(resampler={"type": resampler}, geometry={"overlap": 0.0},
                      stages={"resampler": {"lr": 1e-2, "max_steps": 15}})
    built = build_stage(cfg, "resampler")
    system = built.system
    if resampler == "bimamba":
        assert system.model.resampler.kernel_path == "reference"   # CPU: the pure-PyTorch scan
    optimizer = system.configure_optimizers()["optimizer"]
    batch = _batch(built, cfg, "resampler")
    losses = []
    for _ in range(15):
        optimizer.zero_grad(set_to_none=True)
        loss = system.compute_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.25, losses            # ~6.05 -> ~5.5-5.7 here
    assert max(losses[-3:]) < min(losses[:3]), losses


def test_compiled_blocks_keep_names_and_loss(cfg_factory):
    """runtime.compile compiles every LM and vision block in place: parameter names (checkpoints, LoRA adapters)
    are unchanged and the loss is the eager loss. (On a CPU: aot_eager, so CI machines need no C++ toolchain.)"""
    cfg = cfg_factory(resampler={"type": "mlp"}, geometry={"overlap": 0.0})
    built = build_stage(cfg, "resampler")
    system = built.system.eval()
    batch = _batch(built, cfg, "resampler")
    names = [n for n, _ in system.named_parameters()]
    with torch.no_grad():
        eager = system.compute_loss(batch)
    n = compile_blocks(system.model, "cpu")
    with torch.no_grad():
        compiled = system.compute_loss(batch)
    assert n == len(system.model.causal_lm().model.layers) + len(system.model.vision.encoder_layers())
    assert [name for name, _ in system.named_parameters()] == names
    assert all(block._compiled_call_impl is not None for block in system.model.vision.encoder_layers())
    torch.testing.assert_close(compiled, eager)
