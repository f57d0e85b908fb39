"""The one prompt builder that training and evaluation share, so both see byte-identical prompts (SPEC §2.7).

A prompt is the tokenizer's own chat template applied to one user turn::

    <|vision_start|><|image_pad|><|vision_end|>\\n{instruction}

with the generation prompt appended. The single ``<|image_pad|>`` id marks where the model splices in the
visual tokens. A training example is that prompt followed by the answer and ``<|im_end|>``, with the prompt
masked out of the labels; ``<|im_end|>`` is the target that ends a turn, which is also where generation stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from panobench.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

# Special tokens of the real Qwen3 tokenizer that frame the visual tokens; the tiny tokenizer (models/materialize.py)
# defines the same strings so one prompt builder serves both.
VISION_PLACEHOLDER = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips
DEFAULT_INSTRUCTION = "Describe the {query} in this panorama."


class PromptBuilder:
    """Render prompts and training examples with a tokenizer's chat template.

    Args:
        tokenizer: a tokenizer with a chat template and the tokens ``<|image_pad|>``, ``<|vision_start|>``,
            ``<|vision_end|>`` and ``<|im_end|>`` (the tiny materialized one or Qwen3's).
        instruction_template: the instruction, with one ``{query}`` field.
        max_answer_tokens: answers longer than this are cut to this many tokens (the end-of-turn token is still
            appended, so the model learns to stop within the budget generation will give it); None keeps all.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        instruction_template: str = DEFAULT_INSTRUCTION,
        max_answer_tokens: int | None = None,
    ) -> None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        try:
            instruction_template.format(query="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"instruction_template {instruction_template!r} must have exactly the field "
                              f"{{query}}: {err}") from err
        if "{query}" not in instruction_template:
            raise ConfigError(f"instruction_template {instruction_template!r} has no {{query}} field")
        if max_answer_tokens is not None and max_answer_tokens < 1:
            raise ConfigError(f"max_answer_tokens={max_answer_tokens!r}; expected a positive int or None")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"tokenizer {name!r} has no chat template")
        vocab = tokenizer.get_vocab()
        for token in (VISION_PLACEHOLDER, VISION_START, VISION_END, IM_END):
            if token not in vocab:
                raise ConfigError(f"tokenizer {name!r} has no token {token!r}")
        self.tokenizer = tokenizer
        self.instruction_template = instruction_template
        self.max_answer_tokens = max_answer_tokens
        self._name = name
        self._placeholder_id: int = vocab[VISION_PLACEHOLDER]
        self._im_end_id: int = vocab[IM_END]
        stops = [self._im_end_id, tokenizer.eos_token_id, vocab.get(END_OF_TEXT)]
        self._stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))
        self._prompt_cache: dict[str, tuple[int, ...]] = {}  # queries repeat a lot; rendering is not free
        self.num_truncated = 0

    @property
    def placeholder_id(self) -> int:
        """Id of ``<|image_pad|>``, the one position the visual tokens replace."""
        return self._placeholder_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|im_end|>`` first, then the tokenizer's eos and ``<|endoftext|>``."""
        return list(self._stop_ids)

    @property
    def end_of_turn_ids(self) -> list[int]:
        """Ids appended after an answer in training targets: ``[<|im_end|>]``."""
        return [self._im_end_id]

    def user_content(self, query: str) -> str:
        """The user turn's text: vision markers, newline, instruction."""
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"empty query {query!r}; every sample needs a query phrase")
        return f"{VISION_START}{VISION_PLACEHOLDER}{VISION_END}\n{self.instruction_template.format(query=query)}"

    def prompt_ids(self, query: str) -> list[int]:
        """Token ids of the prompt for ``query``, ending with the assistant generation prompt.

        Raises:
            InputError: the query is empty or itself contains the image placeholder.
            ConfigError: the chat template does not keep the placeholder as exactly one token.
        """
        cached = self._prompt_cache.get(query)
        if cached is None:
            messages = [{"role": "user", "content": self.user_content(query)}]
            # enable_thinking=False: Qwen3's template then writes an empty think block; others ignore the flag.
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False
            )
            ids = _as_int_list(ids)
            count = ids.count(self._placeholder_id)
            if count != 1:
                if VISION_PLACEHOLDER in query:
                    raise InputError(f"query {query!r} contains the image placeholder {VISION_PLACEHOLDER!r}")
                raise ConfigError(f"chat template of tokenizer {self._name!r} yields {count} {VISION_PLACEHOLDER!r} "
                                  "tokens in the prompt; expected exactly 1")
            cached = tuple(ids)
            self._prompt_cache[query] = cached
        return list(cached)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of ``answer`` (no special tokens), cut to ``max_answer_tokens`` if set."""
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"empty answer {answer!r}; a training target needs text")
        ids = _as_int_list(self.tokenizer.encode(answer, add_special_tokens=False))
        if self.max_answer_tokens is not None and len(ids) > self.max_answer_tokens:
            if self.num_truncated == 0:
                logger.warning("answer of %d tokens cut to max_answer_tokens=%d (further cuts are counted in "
                               "PromptBuilder.num_truncated): %r", len(ids), self.max_answer_tokens, answer)
            self.num_truncated += 1
            ids = ids[: self.max_answer_tokens]
        return ids

    def training_example(self, query: str, answer: str) -> tuple[list[int], list[int]]:
        """Input ids and labels for one (query, answer) pair.

        Returns:
            ``(input_ids, labels)``, both of length ``T = len(prompt) + len(answer) + 1``. ``input_ids[:len(prompt)]``
            equals :meth:`prompt_ids`; ``labels`` is ``-100`` over the prompt, then the answer ids and
            ``<|im_end|>``. Labels are unshifted (the causal LM shifts them).
        """
        prompt = self.prompt_ids(query)
        target = self.answer_ids(answer) + self.end_of_turn_ids
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    def decode_answer(self, ids: Sequence[int] | Any) -> str:
        """Text of generated ``ids``: cut at the first stop token, special tokens dropped, whitespace stripped."""
        ids = _as_int_list(ids)
        for i, token in enumerate(ids):
            if token in self._stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _as_int_list(ids: Any) -> list[int]:
    """Plain ``list[int]`` from a list, a 1-D tensor/array, or a one-row BatchEncoding-style ``input_ids``."""
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"expected one sequence of ids, got {len(ids)}")
        ids = ids[0]
    return [int(i) for i in ids]
