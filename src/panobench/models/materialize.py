"""Materialize tiny randomly-initialised SigLIP/Qwen3 models and a corpus-trained tokenizer to local directories.

The embedded default (SPEC §4) downloads nothing: this writes ``<out>/vision/`` (a ``SiglipVisionModel``) and
``<out>/llm/`` (a ``Qwen3ForCausalLM`` plus its tokenizer) with ``save_pretrained``, so training later loads them
through the very ``from_pretrained`` path a hub id takes (:mod:`panobench.models.backbones`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from panobench.data.prompts import (
    DEFAULT_INSTRUCTION,
    END_OF_TEXT,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    VISION_END,
    VISION_PLACEHOLDER,
    VISION_START,
    PromptBuilder,
)
from panobench.errors import ConfigError, InputError
from panobench.models.backbones import load_language_model, load_vision_backbone
from panobench.utils.io import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

# 64 px views cut into 8 px patches: 8x8 = 64 tokens per view, 576 for 8 tiles + 1 global view.
TINY_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}

if "vision_use_head" in transformers.SiglipVisionConfig().to_dict():
    # The pooled output is never used: no dead parameters in the tiny model (transformers >= 5.2x has the switch).
    TINY_VISION["vision_use_head"] = False

TINY_LLM: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,  # 9 views x 64 tokens + text fits with room to spare
    "tie_word_embeddings": True,  # as in Qwen3-0.6B
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}

DEFAULT_VOCAB_SIZE = 1024  # an upper bound: BPE stops merging early on a small corpus
CORPUS_COLUMNS = ("query", "annotation")

# Order fixes the ids: <|endoftext|> is 0, the image placeholder 5.
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PLACEHOLDER)

# Qwen's ChatML for plain text turns (no tools, no thinking blocks): `<|im_start|>{role}\n{content}<|im_end|>\n`,
# then `<|im_start|>assistant\n` for the generation prompt. Extra kwargs such as enable_thinking are ignored.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_corpus(corpus_csvs: list[str | os.PathLike]) -> list[str]:
    """Texts of the ``query`` and ``annotation`` columns of each CSV, in file and row order.

    Raises:
        InputError: a file is missing, lacks one of the columns, or the whole corpus is empty.
    """
    texts: list[str] = []
    for csv_path in corpus_csvs:
        path = Path(csv_path)
        if not path.is_file():
            raise InputError(f"tokenizer corpus: no such CSV file {str(path)!r}")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CORPUS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{str(path)!r}: missing column(s) {missing}; header is {reader.fieldnames}")
            for row in reader:
                texts.extend(row[c] for c in CORPUS_COLUMNS if row[c])
    if not texts:
        raise InputError(f"tokenizer corpus is empty: no query/annotation text in {[str(p) for p in corpus_csvs]}")
    return texts


def train_tokenizer(
    texts: list[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = TINY_LLM["max_position_embeddings"]
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (Qwen-style, exact decode round trip) on ``texts``.

    Deterministic given ``texts`` and ``vocab_size``. The result has the ChatML chat template and the special
    tokens of :data:`SPECIAL_TOKENS`; like Qwen3's instruct tokenizer, eos is ``<|im_end|>`` and pad
    ``<|endoftext|>``.
    """
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ConfigError(f"vocab_size={vocab_size} is below the {min_size} byte-level + special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token needed
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def materialize_tiny_models(
    out_dir: str | os.PathLike,
    corpus_csvs: list[str | os.PathLike],
    *,
    seed: int = 0,
    vision_arch: dict[str, Any] = TINY_VISION,
    llm_arch: dict[str, Any] = TINY_LLM,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    lm_warmup_steps: int = 0,
    lm_warmup_csv: str | os.PathLike | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """Write ``out_dir/vision/``, ``out_dir/llm/`` and ``out_dir/materialize.json`` atomically.

    Args:
        out_dir: destination; replaced as a whole (written to a temp directory, then renamed).
        corpus_csvs: QuIC-360-format CSVs whose query/annotation texts train the tokenizer.
        seed: weights are a function of (seed, archs); the same seed gives identical tensors.
        vision_arch: ``SiglipVisionConfig`` fields of the vision tower.
        llm_arch: ``Qwen3Config`` fields of the LM, without vocab_size (it is the tokenizer's size).
        vocab_size: upper bound for the BPE vocabulary.
        lm_warmup_steps: text-only language-model warm-up on the (query, annotation) rows of ``lm_warmup_csv``
            (the training split), in the stages' chat format. A real Qwen3 arrives pre-trained; stage 2 keeps the
            LM frozen, so a frozen *random* LM would leave nothing to align the vision tokens to. 0 = random.
        lm_warmup_csv: the CSV the warm-up reads (never the test split).
        instruction: the prompt instruction template (``prompt_instruction`` of the run config), so the warm-up
            sees byte-identical prompts to training and evaluation.

    Returns:
        The manifest written to ``materialize.json`` (paths, seed, resolved archs, corpus checksums, versions).
    """
    if "vocab_size" in llm_arch:
        raise ConfigError("llm_arch must not set vocab_size: the LM's vocabulary is the trained tokenizer's")
    out_dir = Path(out_dir)
    texts = read_corpus(corpus_csvs)
    max_len = llm_arch.get("max_position_embeddings", TINY_LLM["max_position_embeddings"])
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_len)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    resolved_llm = {
        **llm_arch,
        "vocab_size": len(tokenizer),
        "bos_token_id": ids[END_OF_TEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[END_OF_TEXT],
    }
    logger.info("tokenizer: %d tokens from %d texts", len(tokenizer), len(texts))

    # fork_rng: seeding here must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = load_vision_backbone("tiny-siglip", init="random", arch=dict(vision_arch))
        torch.manual_seed(seed)
        llm = load_language_model("tiny-qwen3", init="random", arch=resolved_llm)
    if lm_warmup_steps > 0:
        warmup = _warm_up_language_model(llm, tokenizer, lm_warmup_csv, lm_warmup_steps, seed, instruction)
    else:
        warmup = None
    gen = llm.generation_config
    gen.bos_token_id = ids[END_OF_TEXT]
    gen.eos_token_id = [ids[IM_END], ids[END_OF_TEXT]]  # stop at end of turn, or at end of text
    gen.pad_token_id = ids[END_OF_TEXT]
    gen.do_sample = False  # greedy unless the evaluation config says otherwise

    manifest = {
        "seed": seed,
        "vision_dir": str(out_dir / "vision"),
        "llm_dir": str(out_dir / "llm"),
        "tokenizer_dir": str(out_dir / "llm"),
        "vision_arch": dict(vision_arch),
        "llm_arch": resolved_llm,
        "vocab_size": len(tokenizer),
        "special_token_ids": ids,
        "vision_params": sum(p.numel() for p in vision.parameters()),
        "llm_params": sum(p.numel() for p in llm.parameters()),
        "corpus": [{"path": str(p), "sha256": _sha256(p)} for p in corpus_csvs],
        "lm_warmup": warmup,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }
    image_size = vision.config.image_size
    with atomic_dir(out_dir) as tmp:
        vision.save_pretrained(tmp / "vision")
        write_json_atomic(tmp / "vision" / "preprocessor_config.json", _siglip_preprocessor_config(image_size))
        llm.save_pretrained(tmp / "llm")
        tokenizer.save_pretrained(tmp / "llm")
        write_json_atomic(tmp / "materialize.json", manifest)
    logger.info("materialized tiny models in %s: vision %d params, LM %d params, vocab %d", out_dir,
                manifest["vision_params"], manifest["llm_params"], len(tokenizer))
    return manifest


def _warm_up_language_model(llm: torch.nn.Module, tokenizer: Any, csv_path: str | os.PathLike | None, steps: int,
                            seed: int, instruction: str, batch_size: int = 16, lr: float = 3e-3) -> dict[str, Any]:
    """Answer-only training on (query, caption) pairs in the very chat format the stages use; deterministic.

    Each example is :meth:`PromptBuilder.training_example`: the user turn (vision markers with the single
    ``<|image_pad|>`` token, the instruction) and the assistant's caption ending in ``<|im_end|>``, loss on the caption
    only. A warm-up on bare caption texts left no position whose target was a caption's first token, so the LM
    began every answer mid-sentence ("are three objects …") and 40 LoRA steps did not undo that prior.
    """
    if csv_path is None:
        raise ConfigError("lm_warmup_steps > 0 needs lm_warmup_csv (the training split)")
    with open(csv_path, encoding="utf-8", newline="") as f:
        pairs = [(row["query"], row["annotation"]) for row in csv.DictReader(f)
                 if row.get("annotation") and row.get("query")]
    if not pairs:
        raise InputError(f"{csv_path}: no (query, annotation) rows to warm the language model up on")
    prompts = PromptBuilder(tokenizer, instruction_template=instruction)
    examples = [prompts.training_example(query, annotation) for query, annotation in pairs]
    pad = tokenizer.pad_token_id
    losses = []
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
        llm.train()
        for _ in range(steps):
            idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
            length = max(len(examples[i][0]) for i in idx)
            ids = torch.full((batch_size, length), pad, dtype=torch.long)
            labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((batch_size, length), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids, targets = examples[i]
                ids[row, : len(input_ids)] = torch.tensor(input_ids)
                labels[row, : len(targets)] = torch.tensor(targets)
                mask[row, : len(input_ids)] = 1
            loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        llm.eval()
    logger.info("LM warm-up: %d steps on %d (query, caption) pairs in the chat format, loss %.3f -> %.3f", steps,
                len(pairs), losses[0], losses[-1])
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "csv": str(csv_path), "examples": len(pairs),
            "format": "chat (answer-only loss)", "instruction": instruction,
            "loss_first": losses[0], "loss_last": losses[-1]}


def _siglip_preprocessor_config(image_size: int) -> dict[str, Any]:
    """SigLIP's preprocessing ((x/255 - 0.5) / 0.5 at image_size), in the layout real checkpoints ship.

    Written by hand rather than through ``SiglipImageProcessor`` because that class warns about a missing
    torchvision on every save; ``AutoImageProcessor.from_pretrained`` reads the file either way.
    """
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,  # bilinear, as the panorama renderer
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
