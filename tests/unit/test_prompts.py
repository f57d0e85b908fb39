"""The shared prompt builder: one placeholder, masked prompt, train prefix == eval prompt, decoding."""

from __future__ import annotations

import pytest
import torch

from panobench.data.prompts import (
    IGNORE_INDEX,
    IM_END,
    IM_START,
    VISION_END,
    VISION_PLACEHOLDER,
    VISION_START,
    PromptBuilder,
)
from panobench.errors import ConfigError, InputError
from panobench.models.materialize import train_tokenizer

CORPUS = [
    "furniture", "lighting", "plants",
    "A red chair stands near the window, facing the door.",
    "The blue lamp is left of the sofa.",
    "A green plant, next to the red chair.",
] * 3

# A template in the manner of Qwen3's: an empty think block in the generation prompt when thinking is off.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def builder(tokenizer):
    return PromptBuilder(tokenizer)


def test_prompt_renders_chatml_with_one_placeholder(builder, tokenizer):
    ids = builder.prompt_ids("furniture")
    assert ids.count(builder.placeholder_id) == 1
    assert builder.placeholder_id == tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDER)
    at = ids.index(builder.placeholder_id)
    assert ids[at - 1] == tokenizer.convert_tokens_to_ids(VISION_START)
    assert ids[at + 1] == tokenizer.convert_tokens_to_ids(VISION_END)
    assert tokenizer.decode(ids) == (
        f"{IM_START}user\n{VISION_START}{VISION_PLACEHOLDER}{VISION_END}\n"
        f"Describe the furniture in this panorama.{IM_END}\n{IM_START}assistant\n"
    )


def test_training_prefix_is_the_eval_prompt_and_labels_mask_it(builder):
    answer = "A red chair stands near the window."
    prompt = builder.prompt_ids("lighting")
    input_ids, labels = builder.training_example("lighting", answer)
    assert len(input_ids) == len(labels)
    assert input_ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == input_ids[len(prompt):]
    assert IGNORE_INDEX not in labels[len(prompt):]
    # Targets are the answer then exactly one end-of-turn token, which generation stops at.
    assert labels[-1] == builder.end_of_turn_ids[0] == builder.stop_token_ids[0]
    assert labels[len(prompt):-1] == builder.answer_ids(answer)


def test_answer_recovered_from_labels(builder):
    answer = "A green plant, next to the red chair."
    _, labels = builder.training_example("plants", answer)
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert builder.decode_answer(targets) == answer
    assert builder.tokenizer.decode(targets[:-1]) == answer


def test_decode_answer_cuts_at_stop_and_strips(builder, tokenizer):
    answer_ids = builder.answer_ids("The blue lamp is left of the sofa.")
    junk = builder.answer_ids(" trailing words")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    space = tokenizer.encode("  ", add_special_tokens=False)
    assert builder.decode_answer(space + answer_ids + [im_end] + junk) == "The blue lamp is left of the sofa."
    assert builder.decode_answer(torch.tensor(answer_ids + [tokenizer.pad_token_id] * 3)) == \
        "The blue lamp is left of the sofa."
    assert builder.decode_answer([]) == ""


def test_stop_tokens(builder, tokenizer):
    stops = builder.stop_token_ids
    assert stops[0] == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops
    assert len(stops) == len(set(stops))


def test_max_answer_tokens_cuts_answer_but_keeps_end_of_turn(tokenizer):
    builder = PromptBuilder(tokenizer, max_answer_tokens=3)
    answer = "A red chair stands near the window, facing the door."
    input_ids, labels = builder.training_example("furniture", answer)
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert targets == PromptBuilder(tokenizer).answer_ids(answer)[:3] + builder.end_of_turn_ids
    assert builder.num_truncated == 1
    builder.training_example("furniture", "red")
    assert builder.num_truncated == 1


def test_custom_instruction(tokenizer):
    builder = PromptBuilder(tokenizer, instruction_template="What {query} is visible?")
    assert "What plants is visible?" in tokenizer.decode(builder.prompt_ids("plants"))


def test_qwen3_style_thinking_template_keeps_prefix_identity(tokenizer):
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.chat_template = THINKING_TEMPLATE
    builder = PromptBuilder(tok)
    prompt = builder.prompt_ids("furniture")
    assert tok.decode(prompt).endswith(f"{IM_START}assistant\n<think>\n\n</think>\n\n")
    input_ids, labels = builder.training_example("furniture", "A red chair.")
    assert input_ids[: len(prompt)] == prompt
    assert prompt.count(builder.placeholder_id) == 1


def test_bad_inputs_are_errors(builder):
    with pytest.raises(InputError, match="query"):
        builder.prompt_ids("  ")
    with pytest.raises(InputError, match="placeholder"):
        builder.prompt_ids(f"chair {VISION_PLACEHOLDER}")
    with pytest.raises(InputError, match="answer"):
        builder.training_example("furniture", "")


def test_bad_configuration_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="query"):
        PromptBuilder(tokenizer, instruction_template="Describe this panorama.")
    with pytest.raises(ConfigError, match="query"):
        PromptBuilder(tokenizer, instruction_template="Describe the {thing}.")
    with pytest.raises(ConfigError, match="max_answer_tokens"):
        PromptBuilder(tokenizer, max_answer_tokens=0)


def test_template_that_drops_the_placeholder_is_an_error():
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.chat_template = "{{- '<|im_start|>assistant\\n' }}"  # ignores the user turn entirely
    with pytest.raises(ConfigError, match="0 '<\\|image_pad\\|>' tokens"):
        PromptBuilder(tok).prompt_ids("furniture")
