"""Collation shared by training and evaluation: dataset items -> padded token batches (one prompt builder for both).
"""

from __future__ import annotations

from typing import Any

import torch

from panobench.data.prompts import IGNORE_INDEX, PromptBuilder


class TrainCollator:
    """Batch of dataset items -> erp [B,3,H,W] uint8, input_ids/attention_mask/labels [B, L] (right-padded)."""

    def __init__(self, prompts: PromptBuilder, pad_id: int) -> None:
        self.prompts, self.pad_id = prompts, pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [self.prompts.training_example(it["query"], it["annotation"]) for it in items]
        length = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"erp": torch.stack([it["erp"] for it in items]), "input_ids": input_ids, "attention_mask": mask,
                "labels": labels}


class GenerateCollator:
    """Grouped eval items -> erp and left-padded prompt ids (batched generation needs left padding)."""

    def __init__(self, prompts: PromptBuilder, pad_id: int) -> None:
        self.prompts, self.pad_id = prompts, pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [self.prompts.prompt_ids(it["query"]) for it in items]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, length - len(ids):] = torch.tensor(ids)
            mask[i, length - len(ids):] = 1
        return {"erp": torch.stack([it["erp"] for it in items]), "input_ids": input_ids, "attention_mask": mask,
                "items": [{k: v for k, v in it.items() if k != "erp"} for it in items]}
