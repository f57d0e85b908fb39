"""Does a cell's model have the image information, and does stage 2 learn to pass it to the LM?

Two measurements on one resolved cell config (``results/<name>/configs/<cell>.yaml``, run from the workflow's
directory so that its relative paths resolve), on the training split:

1. **Tower probe** — a linear classifier on the vision tower's output tokens predicts which palette colour covers
   each patch (labels from the rendered views' own pixels; synthetic data only). High accuracy = the information is
   in the tokens the resampler reads.
2. **Bridge learning curve** — the stage-2 model (the cell's start: its vision checkpoint, fresh resampler /
   projector / PE, frozen LM) trained as stage 2 trains it, for ``--steps`` steps at the stage's lr and batch size;
   every ``--every`` steps the valid answer loss and the content-word accuracy (colours, shapes, counts, directions,
   elevations) are measured twice: with the real panoramas and with the blind evaluation's grey one. Equal values =
   the bridge hands the LM image-independent tokens.

    python benchmarks/image_use.py --config results/default/configs/ov0.00_fov90_qformer_vis-vicreg-ov0.5_seed0.yaml \\
        --steps 75 --every 25 --out image_use.json
    python benchmarks/image_use.py --config CELL.yaml --steps 2 --every 1 --probe-images 4 --out /tmp/iu.json  # CPU mode

Numbers from it are in ``docs/embedded-default.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from panobench.config import load_run_config
from panobench.data.csvdata import PanoramaCaptionDataset
from panobench.data.prompts import IGNORE_INDEX
from panobench.data.synthetic import DIRECTIONS, ELEVATIONS, PALETTE, SHAPES
from panobench.evaluation.generate import BLIND_GREY
from panobench.models.assembly import build_stage_model
from panobench.stages import STAGES, component_of

STAGE = "resampler"
PALETTE_TOLERANCE = 40   # a pixel is a palette colour when every channel is within this distance
MIN_PATCH_SHARE = 0.3    # a patch is labelled with a colour covering at least this share of it


def content_words() -> set[str]:
    words = set(PALETTE) | set(SHAPES) | {"one", "two", "three", "four"}
    for _, phrase in DIRECTIONS:
        words |= set(phrase.split())
    for phrase in ELEVATIONS.values():
        words |= set(phrase.split())
    return words - {"the", "you", "of", "on", "in", "to", "your", "at"}


def patch_labels(views: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 views ``[N, 3, S, S]`` -> per-patch label ``[N, (S/patch)**2]``: palette index, or len(PALETTE)."""
    x = views.float().unfold(2, patch, patch).unfold(3, patch, patch)         # N, 3, g, g, p, p
    x = x.permute(0, 2, 3, 4, 5, 1).reshape(views.shape[0], -1, patch * patch, 3)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
    share = ((x.unsqueeze(-2) - palette).abs().amax(-1) <= PALETTE_TOLERANCE).float().mean(-2)  # N, T, P
    best, label = share.max(-1)
    return torch.where(best >= MIN_PATCH_SHARE, label, torch.full_like(label, len(PALETTE)))


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int) -> dict[str, float]:
    """Softmax regression on 80 % of the rows, accuracy on the rest (all rows, and rows whose label is a colour)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(x[train] @ weight + bias, labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (x[test] @ weight + bias).argmax(-1)
    objects = labels[test] < len(PALETTE)
    return {"accuracy": float((predicted == labels[test]).float().mean()),
            "accuracy_object_patches": float((predicted[objects] == labels[test][objects]).float().mean()),
            "object_patch_share": float(objects.float().mean()), "test_rows": int(len(test))}


def tower_probe(model: Any, dataset: PanoramaCaptionDataset, images: int, seed: int) -> dict[str, Any]:
    urls, erps = set(), []
    for i in range(len(dataset)):
        item = dataset[i]
        if item["url"] not in urls:
            urls.add(item["url"])
            erps.append(item["erp"])
        if len(erps) == images:
            break
    with torch.no_grad():
        views = model.render(torch.stack(erps)).flatten(0, 1)                  # [N·V, 3, S, S]
        tokens = model.vision(views)                                           # [N·V, T, D]
    labels = patch_labels(views, model.vision.patch_size).flatten()
    result = linear_probe(tokens.flatten(0, 1), labels, len(PALETTE) + 1, seed)
    return {"images": len(erps), "views": int(views.shape[0]), "patches": int(labels.numel()), **result}


class Batches:
    """(erp, input_ids, mask, labels) batches of a split, right-padded as the stages' collator pads them."""

    def __init__(self, dataset: PanoramaCaptionDataset, prompts: Any, pad_id: int) -> None:
        self.dataset, self.prompts, self.pad_id = dataset, prompts, pad_id

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        items = [self.dataset[i] for i in indices]
        pairs = [self.prompts.training_example(it["query"], it["annotation"]) for it in items]
        length = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(items), length), self.pad_id)
        labels = torch.full((len(items), length), IGNORE_INDEX)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (p, lab) in enumerate(pairs):
            ids[row, : len(p)] = torch.tensor(p)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(p)] = 1
        return torch.stack([it["erp"] for it in items]), ids, mask, labels


@torch.no_grad()
def answer_scores(model: Any, batch: tuple[torch.Tensor, ...], content_ids: torch.Tensor) -> dict[str, float]:
    erp, ids, mask, labels = batch
    embeds, merged_mask, merged_labels = model._merge(ids, mask, model.encode_images(erp), labels)
    logits = model.causal_lm()(inputs_embeds=embeds, attention_mask=merged_mask).logits[:, :-1].float()
    targets = merged_labels[:, 1:]
    valid = targets != IGNORE_INDEX
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    content = valid & torch.isin(targets, content_ids)
    right = (logits.argmax(-1) == targets) & content
    return {"answer_loss": float(per_token[valid].mean()),
            "content_loss": float(per_token[content].mean()) if content.any() else float("nan"),
            "content_accuracy": float(right.sum() / content.sum()) if content.any() else float("nan")}


def bridge_curve(cfg: Any, steps: int, every: int, lr: float | None, batch_size: int | None, valid_rows: int,
                 seed: int) -> tuple[dict[str, Any], Any, Any]:
    built = build_stage_model(cfg, STAGE)
    model, prompts, tokenizer = built.model, built.prompts, built.tokenizer
    keep = STAGES[STAGE].trained_components(
        resampler_has_grid=model.resampler.output_grid(model.vision.grid) is not None,
        train_resampler=cfg.stages[STAGE].train_resampler)
    for name, param in model.named_parameters():
        param.requires_grad_(component_of(name) in keep)
    stage_cfg = cfg.stages[STAGE]
    lr = lr or stage_cfg.lr
    batch_size = batch_size or stage_cfg.batch_size
    erp_size = (cfg.data.erp_height, cfg.data.erp_width)
    train = PanoramaCaptionDataset(cfg.data.train_csv, cfg.data.root, erp_size=erp_size)
    valid = PanoramaCaptionDataset(cfg.data.valid_csv, cfg.data.root, erp_size=erp_size)
    batches = Batches(train, prompts, tokenizer.pad_token_id)
    valid_batch = Batches(valid, prompts, tokenizer.pad_token_id)(list(range(min(valid_rows, len(valid)))))
    grey_batch = (torch.full_like(valid_batch[0], BLIND_GREY), *valid_batch[1:])
    words = content_words()
    content_ids = torch.tensor([i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() in words])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    curve, start = [], time.perf_counter()

    def measure(step: int) -> None:
        model.eval()
        point = {"step": step, "real": answer_scores(model, valid_batch, content_ids),
                 "grey": answer_scores(model, grey_batch, content_ids), "seconds": time.perf_counter() - start}
        model.train()
        curve.append(point)
        print(f"step {step:4d}  real: loss {point['real']['answer_loss']:.3f} content acc "
              f"{point['real']['content_accuracy']:.3f}   grey: loss {point['grey']['answer_loss']:.3f} content acc "
              f"{point['grey']['content_accuracy']:.3f}", flush=True)

    model.train()
    measure(0)
    for step in range(1, steps + 1):
        erp, ids, mask, labels = batches([rng.randrange(len(train)) for _ in range(batch_size)])
        loss = model(erp, ids, mask, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            measure(step)
    return ({"stage": STAGE, "lr": lr, "batch_size": batch_size, "steps": steps, "valid_rows": len(valid_batch[0]),
             "content_token_ids": len(content_ids), "resampler_init": built.resampler_init, "curve": curve},
            model, train)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, type=Path, help="a resolved cell config (results/<name>/configs/)")
    ap.add_argument("--steps", type=int, default=75, help="stage-2 steps to train the bridge (default 75)")
    ap.add_argument("--every", type=int, default=25, help="measure real vs grey every N steps (default 25)")
    ap.add_argument("--lr", type=float, default=None, help="default: the stage's lr")
    ap.add_argument("--batch", type=int, default=None, help="default: the stage's batch size")
    ap.add_argument("--valid-rows", type=int, default=120, help="valid rows scored at every measurement")
    ap.add_argument("--probe-images", type=int, default=300, help="training panoramas for the tower probe (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config)
    torch.manual_seed(args.seed)
    bridge, model, train = bridge_curve(cfg, args.steps, args.every, args.lr, args.batch, args.valid_rows, args.seed)
    result: dict[str, Any] = {"config": str(args.config), "cell_id": cfg.cell_id, "resampler": cfg.resampler.type,
                              "bridge": bridge}
    if args.probe_images > 0:
        result["tower_probe"] = tower_probe(model, train, args.probe_images, args.seed)
        probe = result["tower_probe"]
        print(f"tower probe ({probe['patches']} patches of {probe['images']} panoramas): accuracy "
              f"{probe['accuracy']:.3f}, on object patches {probe['accuracy_object_patches']:.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
