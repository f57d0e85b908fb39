"""The naive reference training step of SPEC §8, measured: what the harness's own step must beat.

Eager PyTorch, no panobench code: a frozen SigLIP so400m/16@256 tower (random init from the full config) encodes V
pre-rendered 256x256 views per sample; an MLP resampler maps its 1152-wide patch tokens to the LM width (all 256
tokens per view kept); the V·256 visual tokens are prepended to 128 text tokens and run through Qwen3-0.6B (random
init). The loss is the naive one: logits for ALL positions (vision + text) over the 151936-token vocabulary,
upcast to fp32, cross-entropy on the text targets. AdamW, bf16 autocast with fp32 master weights.

- stage 2: LM frozen; trains the resampler (gradients still flow back through the LM to the visual tokens).
- stage 3: LoRA r32 (alpha 64) on every linear layer of the LM (peft) plus the resampler.

``--loss targets`` swaps in the harness's approach (decoder hidden states, LM head only on rows with a target) so
the two can be compared in one run. ``--tiny`` shrinks every dimension so the same code runs on a CPU in seconds.

    python benchmarks/naive_step.py --stages 3,2 --batch 1,8 --views 5,9 --steps 10 --out naive.json
    python benchmarks/naive_step.py --tiny --steps 2 --out /tmp/naive-tiny.json        # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

GIB = float(1 << 30)
IGNORE_INDEX = -100

# google/siglip2-so400m-patch16-256 vision tower and Qwen/Qwen3-0.6B (the same numbers as
# panobench.models.backbones.FULL_VISION_ARCH / FULL_LLM_ARCH; repeated so this script needs no panobench).
FULL_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": 256, "patch_size": 16, "vision_use_head": True}
FULL_LLM = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8, "vision_use_head": True}
TINY_LLM = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NaiveVLM(nn.Module):
    """views [B, V, 3, S, S] + text ids [B, L] -> loss. Visual tokens first, then the text."""

    def __init__(self, vision: nn.Module, lm: nn.Module) -> None:
        super().__init__()
        self.vision, self.lm = vision, lm
        dv, d = vision.config.hidden_size, lm.config.hidden_size
        self.resampler = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))

    def causal(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, views: torch.Tensor, text: torch.Tensor, loss_mode: str) -> torch.Tensor:
        b, v = views.shape[:2]
        patches = self.vision(pixel_values=views.flatten(0, 1)).last_hidden_state     # [B·V, S, Dv]
        visual = self.resampler(patches).reshape(b, -1, self.lm.config.hidden_size)    # [B, V·S, D]
        embeds = torch.cat([visual, self.lm.get_input_embeddings()(text)], dim=1)     # [B, V·S + L, D]
        labels = torch.cat([text.new_full(visual.shape[:2], IGNORE_INDEX), text], dim=1)
        targets = labels[:, 1:]
        if loss_mode == "naive":
            logits = self.lm(inputs_embeds=embeds).logits                             # [B, V·S+L, vocab]
            logits = logits[:, :-1].float()                                            # fp32 over every position
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        causal = self.causal()
        hidden = causal.model(inputs_embeds=embeds).last_hidden_state                 # [B, V·S+L, D]
        select = targets != IGNORE_INDEX
        logits = causal.lm_head(hidden[:, :-1][select]).float()                       # [M, vocab], targets only
        return F.cross_entropy(logits, targets[select])


def build(tiny: bool, device: torch.device) -> NaiveVLM:
    vcfg, lcfg = (TINY_VISION, TINY_LLM) if tiny else (FULL_VISION, FULL_LLM)
    with device:  # random init directly on the device: seconds instead of minutes for 1B parameters on a CPU
        vision = SiglipVisionModel(SiglipVisionConfig(**vcfg))
        lm = Qwen3ForCausalLM(Qwen3Config(**lcfg))
        model = NaiveVLM(vision, lm)
    vision.requires_grad_(False)
    vision.eval()
    return model


def set_stage(model: NaiveVLM, stage: int, lora_r: int) -> None:
    """Stage 2: LM frozen. Stage 3: LoRA on all linear layers of the LM (attached once)."""
    if stage == 3 and not hasattr(model.lm, "peft_config"):
        from peft import LoraConfig, get_peft_model

        model.lm = get_peft_model(model.lm, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS, bias="none"))
    for name, p in model.lm.named_parameters():
        p.requires_grad_(stage == 3 and "lora_" in name)
    model.resampler.requires_grad_(True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: NaiveVLM, *, stage: int, batch: int, views: int, text_len: int, steps: int, warmup: int,
            loss_mode: str, device: torch.device, seed: int) -> dict[str, Any]:
    """Time ``warmup + steps`` optimizer steps of one (stage, batch, views); report medians and peak memory."""
    size = model.vision.config.image_size
    vocab = model.lm.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Two input sets alternate so repeated steps do not all read one buffer.
    inputs = [(torch.randn(batch, views, 3, size, size, generator=gen).to(device),
               torch.randint(0, vocab, (batch, text_len), generator=gen).to(device)) for _ in range(2)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        views_t, text_t = inputs[i % 2]
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(views_t, text_t, loss_mode)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    measured = times[warmup:] or times
    median = statistics.median(measured)
    ordered = sorted(measured)
    out = {
        "stage": stage, "batch": batch, "views": views, "loss_mode": loss_mode, "status": "ok",
        "visual_tokens": views * (size // model.vision.config.patch_size) ** 2, "text_tokens": text_len,
        "trainable_params": sum(p.numel() for p in params), "measured_steps": len(measured),
        "step_time_median_s": median, "step_time_p90_s": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "samples_per_s": batch / median, "loss_first": losses[0], "loss_last": losses[-1],
        "peak_gpu_allocated_gib": None, "peak_gpu_reserved_gib": None,
    }
    if device.type == "cuda":
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del optimizer, params, inputs
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stages", type=_ints, default=[3, 2], help="comma list of stages (2: LM frozen, 3: LoRA)")
    p.add_argument("--batch", type=_ints, default=[1, 8], help="comma list of batch sizes")
    p.add_argument("--views", type=_ints, default=[5, 9], help="comma list of views per sample (tiles + global)")
    p.add_argument("--loss", default="naive", help="comma list of loss modes: naive (all-position fp32 logits), "
                   "targets (LM head only on target rows)")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU smoke test)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    args = p.parse_args(argv)
    args.loss = [m.strip() for m in args.loss.split(",") if m.strip()]
    bad = [m for m in args.loss if m not in ("naive", "targets")]
    if bad or any(s not in (2, 3) for s in args.stages):
        p.error(f"--loss must be naive/targets and --stages 2/3; got {args.loss} / {args.stages}")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'stage':>5} {'loss':>7} {'batch':>5} {'views':>5} {'seq':>5} {'step_ms':>8} {'p90_ms':>8} " \
           f"{'samples/s':>9} {'alloc_GiB':>9} {'resv_GiB':>9}  status"
    lines = [head]

    def num(r: dict[str, Any], key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[key] * scale) if r.get(key) is not None else "-"

    for r in results:
        lines.append(f"{r['stage']:>5} {r['loss_mode']:>7} {r['batch']:>5} {r['views']:>5} "
                     f"{r.get('visual_tokens', 0) + r.get('text_tokens', 0):>5} {num(r, 'step_time_median_s', 1e3):>8} "
                     f"{num(r, 'step_time_p90_s', 1e3):>8} {num(r, 'samples_per_s', 1, '{:.2f}'):>9} "
                     f"{num(r, 'peak_gpu_allocated_gib'):>9} {num(r, 'peak_gpu_reserved_gib'):>9}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build(args.tiny, device)
    results = []
    # Stage 2 first: stage 3 attaches LoRA to the LM, which stays attached.
    for stage in sorted(args.stages):
        set_stage(model, stage, args.lora_r)
        for loss_mode in args.loss:
            for batch in args.batch:
                for views in args.views:
                    try:
                        r = measure(model, stage=stage, batch=batch, views=views, text_len=args.text_len,
                                    steps=args.steps, warmup=args.warmup, loss_mode=loss_mode, device=device,
                                    seed=args.seed)
                    except torch.OutOfMemoryError as err:
                        # Recorded, not hidden: the table and the JSON say which configuration did not fit.
                        r = {"stage": stage, "batch": batch, "views": views, "loss_mode": loss_mode,
                             "status": "oom", "error": str(err).splitlines()[0]}
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    results.append(r)
                    print(table([r]).splitlines()[1], flush=True)
    record = {"env": environment(device), "tiny": args.tiny, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                         for k, v in vars(args).items()},
              "results": results}
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.out)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
