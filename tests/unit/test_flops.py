"""Model FLOPs by the field's convention (attended pairs, causal counted once, GQA with and without padding), the
datasheet peak table and MFU's None-safety."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from panobench.measurement.flops import count_model_flops, datasheet_peak_flops, mfu

B, HQ, HKV, L, D = 2, 4, 2, 10, 16
TINY_QWEN = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": HQ, "num_key_value_heads": HKV, "head_dim": D, "max_position_embeddings": 128,
             "tie_word_embeddings": True}


def _qkv(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, HQ, L, D, generator=g, requires_grad=requires_grad),
            torch.randn(B, HKV, L, D, generator=g, requires_grad=requires_grad),
            torch.randn(B, HKV, L, D, generator=g, requires_grad=requires_grad))


def _attention_only(fn) -> tuple[int, int]:
    """(forward, backward) attention FLOPs of ``fn(q, k, v)``."""
    q, k, v = _qkv()
    counted = count_model_flops(lambda: fn(q, k, v).sum().backward(), warmup=False)
    fwd = sum(n for op, n in counted.by_op.items() if "backward" not in op)
    return fwd, counted.total - fwd


def test_causal_grouped_query_attention_counts_the_lower_triangle_once() -> None:
    fwd, bwd = _attention_only(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True))
    pairs = B * HQ * L * (L + 1) // 2            # per query head: row i attends keys 0..i
    assert fwd == 2 * pairs * (D + D)            # QKᵀ and PV
    assert bwd == 2 * fwd                        # dP, dV, dQ, dK; the backward's score recompute is not counted


def test_padding_mask_counts_the_allowed_pairs() -> None:
    mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L).clone()
    mask[1, :, :, 6:] = False                    # row 1: 6 real tokens, right-padded
    expected = int(mask.sum()) * HQ              # broadcast over query heads
    fwd, bwd = _attention_only(lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), attn_mask=mask))
    assert fwd == 2 * expected * 2 * D and bwd == 2 * fwd
    # The same pairs through grouped-query heads and an additive mask (-inf = blocked).
    additive = torch.zeros(B, 1, L, L).masked_fill(~mask, float("-inf"))
    fwd_gqa, _ = _attention_only(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=additive,
                                                                                enable_gqa=True))
    assert fwd_gqa == fwd


def test_bidirectional_attention_counts_every_pair() -> None:
    fwd, _ = _attention_only(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert fwd == 2 * B * HQ * L * L * 2 * D


def _lm_flops(mask: torch.Tensor) -> tuple[dict[str, int], int]:
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN)).eval()
    ids = torch.randint(1, TINY_QWEN["vocab_size"], mask.shape)
    with torch.no_grad():
        counted = count_model_flops(lambda: lm(input_ids=ids, attention_mask=mask))
    with torch.no_grad(), FlopCounterMode(display=False) as torch_counter:
        lm(input_ids=ids, attention_mask=mask)
    return counted.by_op, torch_counter.get_total_flops()


def _hand_linear_flops(tokens: int) -> int:
    h, f, v = TINY_QWEN["hidden_size"], TINY_QWEN["intermediate_size"], TINY_QWEN["vocab_size"]
    per_layer = h * HQ * D + 2 * h * HKV * D + HQ * D * h + 3 * h * f       # q, k, v, o, gate, up, down
    return 2 * tokens * (TINY_QWEN["num_hidden_layers"] * per_layer + h * v)  # + the LM head on every position


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "right-padding"])
def test_tiny_qwen3_forward_matches_the_hand_formula(padded: bool) -> None:
    """No padding: transformers drops the mask and SDPA gets grouped-query K/V with is_causal (the case torch
    2.11's own formula asserts on). Padding: a 4-D mask and K/V repeated per query head."""
    mask = torch.ones(B, L, dtype=torch.long)
    real = [L, 7] if padded else [L, L]
    mask[1, real[1]:] = 0
    by_op, torch_total = _lm_flops(mask)
    linear = sum(n for op, n in by_op.items() if op in ("mm", "addmm"))
    attention = sum(n for op, n in by_op.items() if "scaled_dot_product" in op)
    rotary = by_op.get("bmm", 0)                 # inv_freq ⊗ positions, in transformers versions that use a matmul
    assert set(by_op) <= {"mm", "addmm", "bmm"} | {op for op in by_op if "scaled_dot_product" in op}
    assert linear == _hand_linear_flops(B * L)
    # Causal pairs per query head; a pad query row (after the real tokens) attends to the real tokens only.
    pairs = sum(n * (n + 1) // 2 + (L - n) * n for n in real) * HQ
    assert attention == TINY_QWEN["num_hidden_layers"] * 2 * pairs * 2 * D
    assert rotary <= 2 * B * (D // 2) * L
    # torch's own counter, which the harness used before, counts the CPU attention kernel not at all and the CUDA
    # kernels over every pair (forward and backward with its recompute): either way not the convention.
    full = TINY_QWEN["num_hidden_layers"] * 2 * B * HQ * L * L * 2 * D
    assert torch_total - (linear + rotary) in (0, full) and 0 < attention < full


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 NVL", None),                   # other clocks, not tabulated: unknown, not the SXM figure
    ("NVIDIA GH200 480GB", None),                # "H200" inside another part's name is not an H200
    ("Tesla V100-SXM2-32GB", None),
    ("x86_64", None),
    ("", None),
    (None, None),
])
def test_datasheet_peak_by_device_name(name: str | None, peak: float | None) -> None:
    value, part = datasheet_peak_flops(name)
    assert value == peak and (part is None) == (peak is None)


def test_mfu_is_null_when_any_input_is_missing() -> None:
    assert mfu(494.5e12, 1.0, 989e12) == pytest.approx(0.5)
    for args in [(None, 1.0, 989e12), (1e12, None, 989e12), (1e12, 0.0, 989e12), (1e12, 1.0, None),
                 (0, 1.0, 989e12), (1e12, 1.0, 0.0)]:
        assert mfu(*args) is None, args
