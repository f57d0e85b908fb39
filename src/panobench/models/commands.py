"""Subcommands of the models concern (registered by panobench.cli): ``materialize``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser(
        "materialize",
        help="write tiny random-init SigLIP/Qwen3 models and a corpus-trained tokenizer to local directories",
        description="Train a tokenizer on DIR/train.csv and DIR/valid.csv (query + annotation columns) and save "
        "tiny randomly-initialised models to OUT/vision/ and OUT/llm/ with save_pretrained.",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="directory holding train.csv and valid.csv")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="weight-init seed (default: 0)")
    p.add_argument("--lm-warmup-steps", type=int, default=0,
                   help="text-only LM warm-up steps on train.csv (query, caption) pairs in the stages' chat format "
                        "(a stand-in for pre-training)")
    p.add_argument("--prompt-instruction", default=None,
                   help="the run config's prompt_instruction (default: panobench's); the warm-up uses the same prompt")
    p.set_defaults(func=_materialize)


def _materialize(args: argparse.Namespace) -> int:
    # Imported here so `panobench --help` does not pay for importing transformers.
    from panobench.models.materialize import materialize_tiny_models

    corpus = [args.data_dir / "train.csv", args.data_dir / "valid.csv"]
    from panobench.data.prompts import DEFAULT_INSTRUCTION

    materialize_tiny_models(args.out, corpus, seed=args.seed, lm_warmup_steps=args.lm_warmup_steps,
                            lm_warmup_csv=args.data_dir / "train.csv",
                            instruction=args.prompt_instruction or DEFAULT_INSTRUCTION)
    return 0
