"""The training step's speed-relevant choices, checked on CPU: model FLOPs leave gradient-checkpoint recompute
out, the record carries conventional and measured-peak MFU (null on a CPU), frozen weights are stored in the
compute dtype with no per-step activation casts into LoRA, and dropping the padding mask leaves the loss as it was."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from panobench.measurement.flops import count_model_flops
from panobench.models.assembly import attach_lora, build_model, enable_gradient_checkpointing
from panobench.stages import component_of
from panobench.training.datamodule import PanoDataModule
from panobench.training.system import PanoVLMSystem


def _finetune_system(cfg) -> tuple[PanoVLMSystem, dict[str, torch.Tensor]]:
    """Stage-3 model (fresh stage-2 weights, LoRA, the stage's trainable set) and a collated training batch."""
    torch.manual_seed(0)
    model, _, prompts = build_model(cfg, "finetune")
    attach_lora(model, cfg)
    if cfg.stages["finetune"].gradient_checkpointing:
        enable_gradient_checkpointing(model)
    system = PanoVLMSystem(cfg, "finetune", model).train()   # from_pretrained leaves the LM in eval mode
    for name, p in system.named_parameters():
        p.requires_grad_(component_of(name) in {"resampler", "projector", "pe", "lora"})
    data = PanoDataModule(cfg, "finetune", prompts, model.pad_id)
    data.setup()
    return system, data.collate([data.train_set[i] for i in range(3)])


def _step_flops(cfg) -> tuple[int, int]:
    """(model FLOPs, torch's FlopCounterMode total, which counts whatever runs) of one training step."""
    system, batch = _finetune_system(cfg)

    def step() -> None:
        system.compute_loss(batch).backward()

    counted = count_model_flops(step, "cpu", module=system).total
    with FlopCounterMode(display=False) as everything:
        step()
    return counted, everything.get_total_flops()


def test_gradient_checkpoint_recompute_is_not_model_flops(cfg_factory) -> None:
    plain, plain_run = _step_flops(cfg_factory(stages={"finetune": {"gradient_checkpointing": False}}))
    checkpointed, checkpointed_run = _step_flops(cfg_factory(stages={"finetune": {"gradient_checkpointing": True}}))
    assert checkpointed_run > plain_run        # the decoder layers really were recomputed ...
    assert plain > 0 and checkpointed == plain  # ... and that recomputation is not model FLOPs


def test_cpu_record_has_flops_and_null_mfu(trained_cell) -> None:
    for stage in ("resampler", "finetune"):
        cost = trained_cell.records[stage]["cost"]
        assert cost["flops_per_step"] > cost["attention_flops_per_step"] > 0
        assert "causal counted once" in cost["flops_convention"]
        for key in ("device_peak_flops", "device_peak_source", "mfu", "measured_peak_flops", "mfu_measured_peak"):
            assert cost[key] is None, key   # a CPU has no datasheet row and no measured CUDA matmul rate


def test_loss_curve_is_recorded_per_optimizer_step(trained_cell) -> None:
    loss = trained_cell.records["finetune"]["loss"]
    assert loss["curve_start_step"] == 0 and len(loss["curve"]) == trained_cell.records["finetune"]["steps"]
    assert all(torch.isfinite(torch.tensor(loss["curve"])))


class _Casts(TorchDispatchMode):
    """Counts dtype casts (``aten._to_copy``) by (source, target) dtype and the largest tensor cast."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype != out.dtype:
            key = (str(args[0].dtype), str(out.dtype))
            self.largest[key] = max(self.largest[key], out.numel())
        return out


def test_frozen_weights_in_compute_dtype_and_lora_inputs_not_cast(cfg_factory) -> None:
    cfg = cfg_factory(runtime={"precision": "bf16-mixed"})
    system, batch = _finetune_system(cfg)
    dtypes = collections.defaultdict(set)
    for name, p in system.named_parameters():
        dtypes[(component_of(name), p.requires_grad)].add(p.dtype)
    # Frozen backbones are stored in bf16 (autocast has nothing to cast), trainable parts stay fp32 master weights.
    assert dtypes[("vision", False)] == {torch.bfloat16} and dtypes[("lm", False)] == {torch.bfloat16}
    for comp in ("lora", "resampler", "projector", "pe"):
        assert dtypes[(comp, True)] == {torch.float32}, comp
    casts = _Casts()
    with casts, torch.autocast("cpu", dtype=torch.bfloat16):
        system.compute_loss(batch)
    # No bf16 activation goes up to fp32 on its way into a LoRA adapter (peft's input cast is off): the only
    # bf16 -> fp32 casts left are the model's own (RMSNorm statistics, the fp32 loss), no larger than a hidden state
    # [B, L', D] or the selected logits.
    lm = system.model.causal_lm().config
    hidden = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] + system.model.num_visual_tokens) \
        * lm.hidden_size
    assert casts.largest[("torch.bfloat16", "torch.float32")] <= max(hidden, int((batch["labels"] != -100).sum())
                                                                     * lm.vocab_size)
    peft_layers = [m for m in system.model.lm.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert peft_layers and not any(m.cast_input_dtype_enabled for m in peft_layers)


def test_dropping_the_padding_mask_keeps_the_loss(cfg_factory) -> None:
    system, batch = _finetune_system(cfg_factory())
    assert (batch["attention_mask"] == 0).any()          # the batch really is right-padded
    model = system.model
    with torch.no_grad():
        dropped = system.compute_loss(batch)
        # The same loss with the padding mask passed to the decoder, as before.
        vision = model.encode_images(batch["erp"])
        embeds, mask, labels = model._merge(batch["input_ids"], batch["attention_mask"], vision, batch["labels"])
        causal = model.causal_lm()
        hidden = causal.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        select = labels[:, 1:] != -100
        masked = F.cross_entropy(causal.lm_head(hidden[:, :-1][select]).float(), labels[:, 1:][select])
    torch.testing.assert_close(dropped, masked, rtol=1e-5, atol=1e-5)


def test_left_padded_training_batch_is_refused(cfg_factory) -> None:
    system, batch = _finetune_system(cfg_factory())
    flipped = {k: (v.flip(1) if k in ("input_ids", "attention_mask", "labels") else v) for k, v in batch.items()}
    with pytest.raises(RuntimeError, match="right-padded"):
        system.compute_loss(flipped)
