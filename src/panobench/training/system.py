"""PanoVLMSystem: the LightningModule for every stage (loss, logging, checkpoint contents, optimizers).

Checkpoints hold only what the stage table says a stage saves, in the format of :mod:`panobench.models.checkpoint`
(which also loads them, strictly, for the next stage and for evaluation); resuming checks that a checkpoint comes
from this very run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from panobench.config import RunConfig
from panobench.errors import CheckpointError, TrainingError
from panobench.geometry.rays import pool_geometry, tile_correspondences
from panobench.models.checkpoint import check_same_run, checkpoint_metadata, saved_keys
from panobench.models.vlm import PanoVLM
from panobench.stages import get_stage

logger = logging.getLogger(__name__)


def vicreg_loss(za: torch.Tensor, zb: torch.Tensor, sim_w: float, var_w: float, cov_w: float) -> torch.Tensor:
    """VICReg (Bardes et al. 2022) between paired embeddings za, zb: [M, E]."""
    sim = F.mse_loss(za, zb)

    def var_cov(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        var = F.relu(1.0 - std).mean()
        cov = (z.T @ z) / max(1, z.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        return var, off.pow(2).sum() / z.shape[1]

    va, ca = var_cov(za)
    vb, cb = var_cov(zb)
    return sim_w * sim + var_w * (va + vb) + cov_w * (ca + cb)


class PanoVLMSystem(pl.LightningModule):
    """One training stage of a PanoVLM. The stage table's ``saved_components`` decides what goes into checkpoints."""

    def __init__(self, cfg: RunConfig, stage: str, model: PanoVLM) -> None:
        super().__init__()
        self.cfg, self.stage, self.model = cfg, stage, model
        self.spec = get_stage(stage)
        self.stage_cfg = cfg.stages[stage]
        self.strict_loading = False   # frozen backbones are not in our checkpoints; on_load_checkpoint checks keys
        self.vicreg_projector: nn.Module | None = None
        self.vision_checkpoint: str | None = None   # stage-1 checkpoint the vision encoder came from (set by builder)
        self.step_losses: list[float] = []
        self.vicreg_uses_resampler = False
        if self.spec.objective == "vicreg":
            self._setup_vicreg()

    # ------------------------------------------------------------------------------------------------ stage 1
    def _setup_vicreg(self) -> None:
        model = self.model
        out_grid = model.resampler.output_grid(model.vision.grid)
        self.vicreg_uses_resampler = out_grid is not None
        geom = model.geometry
        if self.vicreg_uses_resampler and model.resampler.pool_factor > 1:
            geom = pool_geometry(geom, model.resampler.pool_factor)
        pairs = tile_correspondences(model.plan, out_grid if self.vicreg_uses_resampler else model.vision.grid)
        n = int(geom.rays.shape[1])
        ia = [p.view_a * n + p.idx_a for p in pairs]
        ib = [p.view_b * n + p.idx_b for p in pairs]
        if not ia or sum(len(x) for x in ia) == 0:
            raise TrainingError(f"stage 'vision' needs overlapping tiles; overlap {self.cfg.geometry.overlap} gives no "
                                "corresponding tokens between neighbouring tiles (use overlap > 0, e.g. 0.5)")
        self.register_buffer("vicreg_index_a", torch.cat(ia), persistent=False)
        self.register_buffer("vicreg_index_b", torch.cat(ib), persistent=False)
        width = model.resampler.out_dim if self.vicreg_uses_resampler else model.vision.hidden_size
        hidden = 2 * width
        self.vicreg_projector = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                              nn.Linear(hidden, hidden))

    @property
    def num_vicreg_pairs(self) -> int:
        return int(self.vicreg_index_a.numel()) if self.spec.objective == "vicreg" else 0

    def _vicreg_step(self, erp: torch.Tensor) -> torch.Tensor:
        tokens = self.model.vision_tokens(erp)                 # [B, V, S, Dv]; global view excluded by the index
        b, v = tokens.shape[:2]
        if self.vicreg_uses_resampler:
            feats = self.model.resampler(tokens.flatten(0, 1))
            feats = feats.view(b, v, feats.shape[1], -1)
        else:
            feats = tokens
        flat = feats.flatten(1, 2)                             # [B, V·N, E]
        za = self.vicreg_projector(flat[:, self.vicreg_index_a].flatten(0, 1).float())
        zb = self.vicreg_projector(flat[:, self.vicreg_index_b].flatten(0, 1).float())
        s = self.stage_cfg
        return vicreg_loss(za, zb, s.vicreg_sim_weight, s.vicreg_var_weight, s.vicreg_cov_weight)

    # ------------------------------------------------------------------------------------------------ steps
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.spec.objective == "vicreg":
            return self._vicreg_step(batch["erp"])
        out = self.model(batch["erp"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        return out["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"non-finite loss ({value}) at step {self.global_step} of stage {self.stage!r} "
                                f"(cell {self.cfg.cell_id}); stopping before anything else is checkpointed")
        self.step_losses.append(value)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["erp"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch["erp"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        s = self.stage_cfg
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95),
                                      fused=torch.cuda.is_available() and self.cfg.runtime.accelerator != "cpu")
        warmup, total = s.warmup_steps, s.max_steps

        def lr_factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def saved_keys(self) -> list[str]:
        model = self.model
        return saved_keys(super().state_dict(), self.cfg, self.stage,
                          resampler_has_grid=model.resampler.output_grid(model.vision.grid) is not None)

    def checkpoint_metadata(self) -> dict[str, Any]:
        return checkpoint_metadata(self.cfg, self.stage, self.model, self.saved_keys(), self.vision_checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = set(self.saved_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint["panobench"] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the checkpoint must come from this very run (same stage, signature and key set)."""
        meta = checkpoint.get("panobench")
        if not isinstance(meta, dict):
            raise CheckpointError("checkpoint has no panobench metadata (not written by panobench train)")
        check_same_run(meta, self.checkpoint_metadata(), what="resume checkpoint")
        got = set(checkpoint["state_dict"])
        expected = set(self.saved_keys())
        if got != expected:
            raise CheckpointError(f"resume checkpoint keys differ: missing {sorted(expected - got)[:3]}, "
                                  f"unexpected {sorted(got - expected)[:3]}")

