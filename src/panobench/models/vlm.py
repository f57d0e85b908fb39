"""PanoVLM: ERP panorama -> anyres-e2p views -> SigLIP tokens -> resampler -> PE + stitching -> projector -> Qwen3.

Shapes (einops letters): B batch, V views (tiles + global), S patch tokens per view, N' resampled tokens per view,
T vision tokens fed to the LM (after stitching), L text length, Dv vision width, Dr resampler width, D LM width.

The LM computes logits only at text positions that carry a target (SPEC §8: logits over vision positions were
most of the memory of the naive step), via the decoder's hidden states and the LM head applied to selected rows.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from panobench.config import RunConfig
from panobench.data.prompts import IGNORE_INDEX
from panobench.geometry.rays import view_geometry
from panobench.geometry.render import render_views
from panobench.geometry.tiling import plan_tiles
from panobench.models.pe import PanoramaPE, token_layout
from panobench.models.resamplers import build_resampler

logger = logging.getLogger(__name__)


class VisionEncoder(nn.Module):
    """SigLIP vision tower wrapper: pixel views [B·V, 3, H, W] (uint8-rendered, normalised here) -> [B·V, S, Dv]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.image_size = int(cfg.image_size)
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def encoder_layers(self) -> nn.ModuleList:
        """The transformer blocks, in order (transformers 4 nests them under ``vision_model``, 5 does not)."""
        inner = getattr(self.model, "vision_model", self.model)
        return inner.encoder.layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # SigLIP's processor normalises with mean = std = 0.5: x in [0, 255] -> [-1, 1].
        x = pixels.float().div(127.5).sub(1.0).to(next(self.model.parameters()).dtype)
        if any(p.requires_grad for p in self.model.parameters()):
            out = self.model(pixel_values=x).last_hidden_state
        else:
            # Frozen tower (stages 2-3): keep no activations for backward; nothing upstream needs gradients.
            with torch.no_grad():
                out = self.model(pixel_values=x).last_hidden_state
        # A bf16 tower feeds fp32 modules (resampler): outside autocast (generation) hand them fp32.
        return out if torch.is_autocast_enabled(out.device.type) else out.float()


class PanoVLM(nn.Module):
    """The benchmarked model family. Built from the resolved config plus already-loaded backbones."""

    def __init__(self, cfg: RunConfig, vision_model: nn.Module, language_model: nn.Module, placeholder_id: int,
                 pad_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.placeholder_id = int(placeholder_id)
        self.pad_id = int(pad_id)
        self.plan = plan_tiles(cfg.geometry.overlap, cfg.geometry.fov, cfg.geometry.pitch_rows)
        self.vision = VisionEncoder(vision_model)
        self.geometry = view_geometry(self.plan, self.vision.grid, include_global=cfg.geometry.include_global,
                                      size=self.vision.image_size)
        self.num_views = int(self.geometry.rays.shape[0])
        self.resampler = build_resampler(cfg.resampler.type, self.vision.hidden_size, dict(cfg.resampler.params),
                                         tokens_per_view=cfg.resampler.tokens_per_view, input_grid=self.vision.grid)
        s = self.vision.grid**2
        n_out = self.resampler.num_output_tokens(s)
        self.layout = token_layout(self.geometry, self.resampler.output_grid(self.vision.grid),
                                   self.resampler.pool_factor, n_out, cfg.stitching)
        self.register_buffer("keep_index", self.layout.keep.flatten().nonzero().squeeze(1), persistent=False)
        lm_dim = int(language_model.config.hidden_size)
        self.projector = nn.Sequential(nn.Linear(self.resampler.out_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.pe = PanoramaPE(self.layout, cfg.pe, lm_dim) if cfg.pe.enabled else None
        self.lm = language_model

    # -------------------------------------------------------------------------------- shapes & records
    @property
    def num_visual_tokens(self) -> int:
        """T: vision tokens per sample that enter the LM."""
        return int(self.keep_index.numel())

    def describe(self) -> dict[str, Any]:
        return {
            "num_tiles": self.plan.num_tiles,
            "num_views": self.num_views,
            "nominal_overlap": self.plan.nominal_overlap,
            "effective_overlap": self.plan.effective_overlap,
            "vision_tokens_per_view": self.vision.grid**2,
            "resampled_tokens_per_view": self.layout.tokens_per_view,
            "visual_tokens_per_sample": self.num_visual_tokens,
            "stitching": self.cfg.stitching,
            "kernel_path": getattr(self.resampler, "kernel_path", "torch"),
        }

    def causal_lm(self) -> nn.Module:
        """The underlying *ForCausalLM (inside a peft wrapper when LoRA is attached)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    # -------------------------------------------------------------------------------- vision path
    def render(self, erp: torch.Tensor) -> torch.Tensor:
        """ERP batch [B, 3, H, W] uint8 -> views [B, V, 3, S, S] uint8 (tiles in yaw order, global last)."""
        return render_views(erp, self.plan, self.vision.image_size, include_global=self.cfg.geometry.include_global)

    def vision_tokens(self, erp: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> SigLIP patch tokens [B, V, S, Dv]."""
        views = self.render(erp)
        b, v = views.shape[:2]
        tokens = self.vision(views.flatten(0, 1))
        return tokens.view(b, v, *tokens.shape[1:])

    def encode_images(self, erp: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> stitched LM-space vision embeddings [B, T, D]."""
        tokens = self.vision_tokens(erp)                                 # [B, V, S, Dv]
        b, v = tokens.shape[:2]
        resampled = self.resampler(tokens.flatten(0, 1))                  # [B·V, N', Dr]
        embeds = self.projector(resampled).view(b, v, resampled.shape[1], -1)  # [B, V, N', D]
        if self.pe is not None:
            embeds = embeds + self.pe().to(embeds.dtype)
        embeds = embeds.flatten(1, 2)                                     # [B, V·N', D]
        return embeds.index_select(1, self.keep_index)                    # [B, T, D]

    # -------------------------------------------------------------------------------- fusion
    def _merge(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace the single placeholder token of each row by the T vision embeddings.

        input_ids/attention_mask/labels: [B, L]; vision: [B, T, D] -> embeds [B, L-1+T, D], mask, labels.
        """
        embed_layer = self.lm.get_input_embeddings()
        is_ph = input_ids == self.placeholder_id
        counts = is_ph.sum(1)
        if not bool((counts == 1).all()):
            raise ValueError(f"each prompt must hold exactly one vision placeholder; found {counts.tolist()}")
        text = embed_layer(input_ids.masked_fill(is_ph, self.pad_id))                    # [B, L, D]
        b, length = input_ids.shape
        t = vision.shape[1]
        # One gather per tensor instead of a per-row Python loop: output position j of row i holds text token j
        # before the placeholder p_i, vision token j - p_i inside [p_i, p_i + T), text token j - T + 1 after.
        pos = is_ph.long().argmax(1, keepdim=True)                                       # [B, 1]
        j = torch.arange(length - 1 + t, device=input_ids.device).unsqueeze(0)           # [1, L']
        in_vision = (j >= pos) & (j < pos + t)                                           # [B, L']
        text_idx = torch.where(j < pos, j, j - t + 1).clamp(0, length - 1)               # [B, L']
        vision_idx = (j - pos).clamp(0, t - 1)                                           # [B, L']
        d = text.shape[-1]
        embeds = torch.where(in_vision.unsqueeze(-1),
                             vision.to(text.dtype).gather(1, vision_idx.unsqueeze(-1).expand(b, -1, d)),
                             text.gather(1, text_idx.unsqueeze(-1).expand(b, -1, d)))
        mask = torch.where(in_vision, attention_mask.new_ones(()), attention_mask.gather(1, text_idx))
        merged_labels = None
        if labels is not None:
            merged_labels = torch.where(in_vision, labels.new_full((), IGNORE_INDEX), labels.gather(1, text_idx))
        return embeds, mask, merged_labels

    def forward(self, erp: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Captioning loss on answer tokens only; logits are computed only where a target exists."""
        vision = self.encode_images(erp)
        embeds, mask, labels = self._merge(input_ids, attention_mask, vision, labels)
        causal = self.causal_lm()
        decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.model
        # Training batches are right-padded (TrainCollator): under the causal mask no real token attends to a later
        # pad, and pad positions carry no target, so the padding mask changes nothing the loss reads. Without it
        # the decoder takes SDPA's causal path (flash kernel, grouped-query K/V used as they are) instead of a
        # materialised [B, 1, L, L] mask (memory-efficient kernel, K/V repeated per query head). The contract is
        # checked on the device, without a host sync; a left-padded batch would fail here, not train wrongly.
        torch._assert_async((mask[:, 1:] <= mask[:, :-1]).all(), "PanoVLM.forward needs right-padded batches")
        # use_cache=False: training needs no KV cache (the decoder would otherwise build one every step).
        hidden = decoder(inputs_embeds=embeds, attention_mask=None, use_cache=False).last_hidden_state  # [B, L', D]
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        h = hidden[:, :-1][select]                                        # [M, D] rows with a target
        logits = causal.lm_head(h).float()                                # [M, vocab], fp32 for a stable CE
        loss = F.cross_entropy(logits, targets[select])
        return {"loss": loss, "num_targets": select.sum(), "seq_len": torch.tensor(embeds.shape[1])}

    @torch.no_grad()
    def generate(self, erp: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
                 eos_token_id: list[int] | int | None = None, cache: Any = None, compile_config: Any = None,
                 on_prefilled: Callable[[], None] | None = None) -> torch.Tensor:
        """Greedy/beam decoding with KV cache from left-padded prompts; returns only the new token ids [B, n].

        Args:
            cache: a preallocated KV cache (``transformers.StaticCache``) to decode into, reset by the caller;
                None = transformers' growing dynamic cache.
            compile_config: ``transformers.CompileConfig`` for the decode step (the prefill stays eager); only with
                a static ``cache``. None = no compilation (also with a static cache, which transformers would
                otherwise compile on its own on a GPU).
            on_prefilled: called once, right after the prefill's logits exist and before the first token is
                chosen: the caller's clock for the prefill / decode split. It sees logits, never changes them.
        """
        from transformers import LogitsProcessor, LogitsProcessorList

        class _Prefilled(LogitsProcessor):
            def __init__(self) -> None:
                self.done = False

            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                if not self.done and on_prefilled is not None:
                    self.done = True
                    on_prefilled()
                return scores

        vision = self.encode_images(erp)
        embeds, mask, _ = self._merge(input_ids, attention_mask, vision)
        causal = self.causal_lm()
        extra: dict[str, Any] = {"disable_compile": compile_config is None}
        if compile_config is not None:
            extra["compile_config"] = compile_config
        if cache is not None:
            extra[cache_argument(causal)] = cache
        if on_prefilled is not None:
            extra["logits_processor"] = LogitsProcessorList([_Prefilled()])
        return causal.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                               num_beams=num_beams, do_sample=do_sample, eos_token_id=eos_token_id,
                               pad_token_id=self.pad_id, use_cache=True, **extra)


def cache_argument(causal_lm: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by: ``cache`` in newer transformers 5 releases, before that
    ``past_key_values`` (generate forwards a user's cache under the same name)."""
    params = inspect.signature(causal_lm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
