"""Stand-ins for the pre-training that real backbones bring, for the embedded default's tiny SigLIP and Qwen3.

At full scale the vision tower (SigLIP2) arrives with features in which objects stand out, and the language model
(Qwen3) arrives able to read and use what is in its context. Random tiny models have neither, and then stages 2-3
cannot teach a model to use the image in a CPU minute: measured on the embedded default, a finetuned model captioned
exactly as well with a grey panorama as with the real one (its "blind" twin), and even with the whole LM trainable,
"what colour is the one object?" stayed at chance for 600 steps. Three short steps, run once by
``panobench materialize`` on the synthetic training split (never valid/test), give the tiny models those abilities:

1. :func:`pretrain_vision_tower` — the tower learns to tell the palette colours apart patch by patch (labels from
   the rendered views' own pixels): SigLIP-like features in which an object's patches differ from the background's.
2. :func:`warm_up_with_context` — the LM learns the captions in the stages' chat format *and* to answer from what
   sits between the vision markers: there, per-object context vectors (each the mean word embedding of the object's
   name plus that of its direction phrase) sit among filler vectors (``<|image_pad|>`` plus a random direction),
   the same structure a visual token has (content + panorama positional encoding).
3. :func:`pretrain_on_images` — the LM then learns to read real visual tokens, through throwaway bridges
   (resampler + projector + PE) of every resampler type and overlap of the matrix in turn, so that no arm is
   favoured; the bridges are discarded, every cell trains its own from scratch in stage 2.

Each step is deterministic given its seed and logs its losses; ``materialize.json`` records what ran.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from panobench.config import RunConfig
from panobench.data.csvdata import PanoramaCaptionDataset
from panobench.data.prompts import IGNORE_INDEX, PromptBuilder
from panobench.data.synthetic import DIRECTIONS, ELEVATIONS, PALETTE, direction_sector, elevation_class, with_article
from panobench.errors import InputError
from panobench.geometry.render import render_views
from panobench.geometry.tiling import plan_tiles
from panobench.models.vlm import PanoVLM

logger = logging.getLogger(__name__)

VISION_PRETRAIN_IMAGES = 512


@dataclass(frozen=True)
class TinyPretraining:
    """What :func:`panobench.models.materialize.materialize_tiny_models` pre-trains, and on which data."""

    data_root: Path                          # the synthetic dataset (train split only is read)
    train_csv: Path
    scenes: Path                             # its scenes.jsonl: objects (colour, shape, yaw, pitch) per image
    bridge_configs: tuple[RunConfig, ...]    # resolved cell configs whose bridges step 3 trains in turn
    vision_steps: int = 150                  # step 1
    context_steps: int = 800                 # step 2 (replaces the text-only warm-up)
    image_steps: int = 300                   # step 3
    batch_size: int = 16
    erp_size: tuple[int, int] = (128, 256)   # (H, W) working ERP size, as the stages load it


# ------------------------------------------------------------------------------------------------------- step 1


def palette_patch_labels(views: torch.Tensor, patch: int, tolerance: int = 30, min_share: float = 0.25) -> torch.Tensor:
    """Per-patch class of rendered views: 0 = background, k = palette colour k-1 covering >= ``min_share`` of it.

    views: ``[N, 3, S, S]`` uint8 -> ``[N, (S/patch)²]`` long, row-major like the tower's patch tokens.
    """
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)                  # [P, 3]
    pixels = views.float().permute(0, 2, 3, 1)                                           # [N, S, S, 3]
    close = (pixels[..., None, :] - palette).abs().amax(-1) < tolerance                  # [N, S, S, P]
    share = F.avg_pool2d(close.permute(0, 3, 1, 2).float(), patch)                       # [N, P, g, g]
    best, colour = share.max(1)
    return torch.where(best >= min_share, colour + 1, torch.zeros_like(colour)).flatten(1)


def pretrain_vision_tower(vision: nn.Module, erps: torch.Tensor, overlaps: Sequence[float], fov: float, steps: int,
                          seed: int, batch_images: int = 8, lr: float = 1e-3) -> dict[str, Any]:
    """Train the whole tower with a linear head to classify each patch's palette colour (head discarded)."""
    config = vision.config
    plans = [plan_tiles(o, fov) for o in overlaps]
    head = nn.Linear(config.hidden_size, len(PALETTE) + 1)
    # Background patches outnumber object patches ~20:1; weigh them down so objects are learnt first.
    weights = torch.tensor([0.1] + [1.0] * len(PALETTE))
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=lr)
    rng = random.Random(seed)
    vision.train()
    losses = []
    for step in range(steps):
        idx = [rng.randrange(len(erps)) for _ in range(batch_images)]
        views = render_views(erps[idx], plans[step % len(plans)], config.image_size).flatten(0, 1)
        labels = palette_patch_labels(views, config.patch_size)
        feats = vision(pixel_values=views.float().div(127.5).sub(1.0)).last_hidden_state   # SigLIP's [-1, 1] input
        loss = F.cross_entropy(head(feats).flatten(0, 1), labels.flatten(), weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    vision.eval()
    logger.info("vision tower pre-training: %d steps, palette-patch loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return {"steps": steps, "task": "palette colour per patch", "loss_first": losses[0], "loss_last": losses[-1]}


# ------------------------------------------------------------------------------------------------------- step 2


def read_scenes(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """``{image url: objects}`` from a synthetic dataset's scenes.jsonl."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no scenes.jsonl; the context warm-up needs the synthetic scenes' ground truth")
    scenes = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                scenes[record["url"]] = record["objects"]
            except (json.JSONDecodeError, KeyError) as err:
                raise InputError(f"{path} line {line_no}: not a scene record ({err})") from None
    return scenes


class _ContextComposer:
    """Builds the warm-up's context vectors from the LM's own (trained) input embeddings."""

    def __init__(self, tokenizer: Any, embeddings: nn.Embedding, filler_id: int) -> None:
        self.embeddings, self.filler_id = embeddings, filler_id

        def ids(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

        self._ids = ids
        self.directions = [ids(f"{d[1]}, {e}") for d in DIRECTIONS for e in ELEVATIONS.values()]

    def _mean(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(ids).mean(0)

    def context(self, objects: list[dict[str, Any]], slots: int, rng: random.Random) -> torch.Tensor:
        """``[slots, D]``: fillers with random directions, each object at 1-4 random slots with its own direction."""
        filler = self.embeddings.weight[self.filler_id]
        vectors = [filler + self._mean(self.directions[rng.randrange(len(self.directions))]) for _ in range(slots)]
        for obj in objects:
            name = self._mean(self._ids(with_article(f"{obj['colour']} {obj['shape']}")))
            where = self._mean(self._ids(f"{DIRECTIONS[direction_sector(obj['yaw'])][1]}, "
                                         f"{ELEVATIONS[elevation_class(obj['pitch'])]}"))
            for _ in range(rng.randint(1, 4)):
                vectors[rng.randrange(slots)] = name + where
        return torch.stack(vectors)


def _pad_embeds(rows: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``(embeddings [L, D], labels [L])`` rows -> inputs_embeds, attention_mask, labels."""
    length = max(len(labels) for _, labels in rows)
    dim = rows[0][0].shape[1]
    embeds = torch.zeros(len(rows), length, dim)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (e, lab) in enumerate(rows):
        embeds[i, : len(lab)] = e
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(lab)] = 1
    return embeds, mask, labels


def warm_up_with_context(lm: nn.Module, tokenizer: Any, prompts: PromptBuilder, examples: list[tuple[str, str, list]],
                         steps: int, seed: int, batch_size: int = 16, slots: tuple[int, int] = (8, 40),
                         lr: float = 3e-3) -> dict[str, Any]:
    """Answer-only training in the chat format, the vision slot holding the scene as context vectors.

    examples: ``(query, caption, objects of its image)``. One example in ten has an empty context (fillers only),
    so the LM also learns the caption language on its own, as the text-only warm-up did.
    """
    embeddings = lm.get_input_embeddings()
    composer = _ContextComposer(tokenizer, embeddings, prompts.placeholder_id)
    encoded = []
    for query, caption, objects in examples:
        ids, labels = prompts.training_example(query, caption)
        cut = ids.index(prompts.placeholder_id)
        encoded.append((ids, labels, cut, objects))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    lm.train()
    losses = []
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            ids, labels, cut, objects = encoded[rng.randrange(len(encoded))]
            n = rng.randint(*slots)
            ctx = composer.context(objects if rng.random() >= 0.1 else [], n, rng)
            text = embeddings(torch.tensor(ids))
            rows.append((torch.cat([text[:cut], ctx, text[cut + 1:]]),
                         labels[:cut] + [IGNORE_INDEX] * n + labels[cut + 1:]))
        embeds, mask, labels = _pad_embeds(rows)
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    lm.eval()
    logger.info("LM warm-up with scene context: %d steps on %d (query, caption) pairs, loss %.3f -> %.3f", steps,
                len(encoded), losses[0], losses[-1])
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "examples": len(encoded),
            "format": "chat (answer-only loss), scene context vectors in the vision slot",
            "loss_first": losses[0], "loss_last": losses[-1]}


# ------------------------------------------------------------------------------------------------------- step 3


def pretrain_on_images(vision: nn.Module, lm: nn.Module, prompts: PromptBuilder, bridge_configs: Sequence[RunConfig],
                       dataset: PanoramaCaptionDataset, steps: int, seed: int, batch_size: int = 16,
                       lr: float = 2e-3) -> dict[str, Any]:
    """Caption training of the LM (vision frozen) through throwaway bridges, one configuration per step in turn."""
    if not bridge_configs:
        raise InputError("image pre-training needs at least one bridge config (a resolved cell config)")
    pad_id = prompts.tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = [PanoVLM(cfg, vision, lm, placeholder_id=prompts.placeholder_id, pad_id=pad_id)
                  for cfg in bridge_configs]
    vision.requires_grad_(False)
    params = list(lm.parameters()) + [p for m in models for n, p in m.named_parameters()
                                      if not n.startswith(("vision.", "lm."))]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses, started = [], time.perf_counter()
    for model in models:
        model.train()
    for step in range(steps):
        model = models[step % len(models)]
        items = [dataset[rng.randrange(len(dataset))] for _ in range(batch_size)]
        pairs = [prompts.training_example(it["query"], it["annotation"]) for it in items]
        length = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        loss = model(torch.stack([it["erp"] for it in items]), input_ids, mask, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    lm.eval()
    tail = max(1, len(losses) // 10)
    logger.info("LM pre-training on images: %d steps through %d throwaway bridges, loss %.3f -> %.3f (%.0f s)", steps,
                len(models), losses[0], sum(losses[-tail:]) / tail, time.perf_counter() - started)
    return {"steps": steps, "batch_size": batch_size, "lr": lr,
            "bridges": [{"resampler": c.resampler.type, "overlap": c.geometry.overlap,
                         "tokens_per_view": c.resampler.tokens_per_view} for c in bridge_configs],
            "loss_first": losses[0], "loss_last_10pct": sum(losses[-tail:]) / tail}


def pretrain_tiny_backbones(vision: nn.Module, lm: nn.Module, tokenizer: Any, instruction: str,
                            plan: TinyPretraining, seed: int) -> dict[str, Any]:
    """Steps 1-3 on ``plan``'s training split; returns the record materialize.json keeps."""
    if not plan.bridge_configs:
        raise InputError("tiny pre-training needs at least one bridge config (a resolved cell config)")
    prompts = PromptBuilder(tokenizer, instruction_template=instruction)
    dataset = PanoramaCaptionDataset(plan.train_csv, plan.data_root, erp_size=plan.erp_size)
    scenes = read_scenes(plan.scenes)
    record: dict[str, Any] = {"data": str(plan.train_csv), "scenes": str(plan.scenes)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = dataset.rows()
        missing = sorted({r["url"] for r in rows if r["url"] not in scenes})
        if missing:
            raise InputError(f"{plan.scenes}: no scene for {len(missing)} training image(s), e.g. {missing[:3]}")
        first = {}
        for i, r in enumerate(rows):
            first.setdefault(r["url"], i)
        # A few hundred distinct panoramas are plenty for a palette task (and keep the uint8 stack ~50 MB).
        erps = torch.stack([dataset[i]["erp"] for i in list(first.values())[:VISION_PRETRAIN_IMAGES]])
        overlaps = sorted({c.geometry.overlap for c in plan.bridge_configs})
        fov = plan.bridge_configs[0].geometry.fov
        record["vision"] = pretrain_vision_tower(vision, erps, overlaps, fov, plan.vision_steps, seed)
        examples = [(r["query"], r["annotation"], scenes[r["url"]]) for r in rows]
        record["context_warm_up"] = warm_up_with_context(lm, tokenizer, prompts, examples, plan.context_steps, seed,
                                                         batch_size=plan.batch_size)
        record["images"] = pretrain_on_images(vision, lm, prompts, plan.bridge_configs, dataset, plan.image_steps,
                                              seed, batch_size=plan.batch_size)
    vision.requires_grad_(True)
    return record
