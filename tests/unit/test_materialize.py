"""Tiny local models: materialize, load back through the hub code path offline, determinism, strict loading."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from panobench.cli import main
from panobench.data.prompts import IM_END, IM_START, VISION_END, VISION_PLACEHOLDER, VISION_START
from panobench.errors import CheckpointError, ConfigError, InputError
from panobench.models.backbones import (
    FULL_LLM_ARCH,
    FULL_VISION_ARCH,
    load_language_model,
    load_tokenizer,
    load_vision_backbone,
)
from panobench.models.materialize import SPECIAL_TOKENS, TINY_LLM, TINY_VISION, materialize_tiny_models

ROWS = [
    ("pano_000.png", "furniture", "A red chair stands near the window, facing the door."),
    ("pano_000.png", "lighting", "The blue lamp is left of the sofa."),
    ("pano_001.png", "furniture", "A green table in the middle of the room."),
    ("pano_001.png", "plants", "A green plant, next to the red chair."),
    ("pano_002.png", "furniture", "Two red chairs and a blue sofa."),
]
SMALL_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 32, "patch_size": 8}
SMALL_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 50, "max_position_embeddings": 64}


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "query", "annotation"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    return [_write_csv(root / "train.csv", ROWS[:3]), _write_csv(root / "valid.csv", ROWS[3:])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "models"
    materialize_tiny_models(out, corpus, seed=0)
    return out


@pytest.fixture
def offline(monkeypatch):
    """Make any hub access an error, as on the project's machines."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_layout_and_manifest(tiny):
    for name in ("vision/config.json", "vision/model.safetensors", "vision/preprocessor_config.json",
                 "llm/config.json", "llm/model.safetensors", "llm/generation_config.json", "llm/tokenizer.json",
                 "llm/chat_template.jinja"):
        assert (tiny / name).is_file(), name
    manifest = json.loads((tiny / "materialize.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["llm_arch"]["vocab_size"] == manifest["vocab_size"]
    assert [c["path"].rsplit("/", 1)[-1] for c in manifest["corpus"]] == ["train.csv", "valid.csv"]
    assert not list(tiny.parent.glob(".models.*")), "temporary directory left behind"


def test_auto_classes_load_offline(tiny, offline):
    vision = AutoModel.from_pretrained(tiny / "vision")
    llm = AutoModelForCausalLM.from_pretrained(tiny / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "llm")
    assert isinstance(vision, SiglipVisionModel)
    assert llm.config.model_type == "qwen3"
    side = TINY_VISION["image_size"]
    tokens = vision(pixel_values=torch.randn(2, 3, side, side)).last_hidden_state
    assert tokens.shape == (2, (side // TINY_VISION["patch_size"]) ** 2, TINY_VISION["hidden_size"])
    logits = llm(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, len(tokenizer))


def test_panobench_loaders(tiny, offline):
    vision = load_vision_backbone(str(tiny / "vision"))
    llm = load_language_model(str(tiny / "llm"), dtype="bfloat16")
    tokenizer = load_tokenizer(str(tiny / "llm"))
    assert vision(torch.zeros(1, 3, 64, 64)).last_hidden_state.shape == (1, 64, 64)
    assert next(llm.parameters()).dtype == torch.bfloat16
    assert llm.config.vocab_size == len(tokenizer)
    assert llm.get_output_embeddings().weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def test_tokenizer_special_tokens_and_chat_template(tiny, offline):
    tokenizer = load_tokenizer(str(tiny / "llm"))
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    # The vision markers survive tokenization as single tokens.
    ids = tokenizer.encode(f"{VISION_START}{VISION_PLACEHOLDER}{VISION_END}", add_special_tokens=False)
    assert ids == [vocab[VISION_START], vocab[VISION_PLACEHOLDER], vocab[VISION_END]]
    # Byte-level BPE: any caption decodes back exactly, even words the corpus never had.
    caption = "A red chair, near the window; zebra-striped 42!"
    assert tokenizer.decode(tokenizer.encode(caption, add_special_tokens=False)) == caption


def test_generation_config_stops_at_end_of_turn(tiny, offline):
    llm = load_language_model(str(tiny / "llm"))
    tokenizer = load_tokenizer(str(tiny / "llm"))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert llm.config.eos_token_id == im_end
    assert llm.generation_config.eos_token_id[0] == im_end
    assert llm.generation_config.pad_token_id == tokenizer.pad_token_id
    assert llm.generation_config.do_sample is False


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_same_seed_same_weights(tmp_path, tiny, corpus):
    again = tmp_path / "again"
    materialize_tiny_models(again, corpus, seed=0)
    for sub in ("vision", "llm"):
        first, second = _state(tiny / sub), _state(again / sub)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), sub
    assert (tiny / "llm/tokenizer.json").read_bytes() == (again / "llm/tokenizer.json").read_bytes()
    other = tmp_path / "other"
    materialize_tiny_models(other, corpus, seed=1)
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(_state(tiny / "vision")[key], _state(other / "vision")[key])


def test_materialize_overwrites_and_leaves_rng_alone(tmp_path, corpus):
    out = tmp_path / "models"
    (out / "stale").mkdir(parents=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    materialize_tiny_models(out, corpus, seed=5, vision_arch=SMALL_VISION)
    assert torch.equal(torch.rand(3), expected)
    assert not (out / "stale").exists()
    assert json.loads((out / "materialize.json").read_text())["vision_arch"] == SMALL_VISION


def test_random_init_from_arch():
    vision = load_vision_backbone("small", init="random", arch=SMALL_VISION)
    assert vision(torch.randn(3, 3, 32, 32)).last_hidden_state.shape == (3, 16, 32)
    llm = load_language_model("small", init="random", arch=SMALL_LLM)
    assert llm(input_ids=torch.tensor([[1, 2, 49]])).logits.shape == (1, 3, 50)


def test_full_size_constants_match_published_sizes():
    # Qwen3-0.6B: 0.60B parameters, 0.44B without embeddings; SigLIP so400m vision tower ~0.43B.
    with torch.device("meta"):
        llm = load_language_model("full", init="random", arch=FULL_LLM_ARCH)
        vision = load_vision_backbone("full", init="random", arch=FULL_VISION_ARCH)
    total = sum(p.numel() for p in llm.parameters())
    assert total == 596_049_920
    assert total - llm.get_input_embeddings().weight.numel() == 440_467_456
    assert 0.42e9 < sum(p.numel() for p in vision.parameters()) < 0.44e9
    assert llm.config.rope_parameters["rope_theta"] == 1e6
    assert (vision.config.image_size // vision.config.patch_size) ** 2 == 256


@pytest.mark.parametrize("loader", [load_vision_backbone, load_language_model])
def test_unknown_arch_key_is_an_error(loader):
    with pytest.raises(ConfigError, match="hidden_sise"):
        loader("x", init="random", arch={"hidden_sise": 32})


def test_bad_arch_value_and_bad_init_are_errors():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_vision_backbone("x", init="random", arch={**SMALL_VISION, "hidden_size": "wide"})
    with pytest.raises(ConfigError, match="patch_size"):
        load_vision_backbone("x", init="random", arch={**SMALL_VISION, "patch_size": 7})
    with pytest.raises(ConfigError, match="init='scratch'"):
        load_language_model("x", init="scratch", arch=SMALL_LLM)
    with pytest.raises(ConfigError, match="dtype"):
        load_language_model("x", init="random", arch=SMALL_LLM, dtype="float13")


@pytest.mark.parametrize("loader", [load_vision_backbone, load_language_model, load_tokenizer])
def test_missing_local_dir_is_an_error(tmp_path, loader, offline):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ConfigError, match="no such local directory.*nowhere.*materialize"):
        loader(str(missing))


def test_unknown_hub_id_offline_is_an_error(offline):
    with pytest.raises(ConfigError, match="not-a-real-org/not-a-model.*materialize"):
        load_language_model("not-a-real-org/not-a-model")


def test_full_siglip_checkpoint_loads_only_the_vision_tower(tmp_path, offline):
    vision_cfg = {**SMALL_VISION, "vision_use_head": True}
    text_cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 40}
    full = SiglipModel(SiglipConfig(vision_config=vision_cfg, text_config=text_cfg))
    full.save_pretrained(tmp_path / "siglip")
    vision = load_vision_backbone(str(tmp_path / "siglip"))
    assert isinstance(vision, SiglipVisionModel)
    assert not any("text" in name for name, _ in vision.named_parameters())
    src = full.vision_model.state_dict()
    loaded = vision.state_dict()
    assert src.keys() == loaded.keys()
    assert all(torch.equal(src[k], loaded[k]) for k in src)


def test_arch_must_match_pretrained_checkpoint(tiny, offline):
    load_vision_backbone(str(tiny / "vision"), arch={"hidden_size": TINY_VISION["hidden_size"]})
    with pytest.raises(ConfigError, match="hidden_size"):
        load_vision_backbone(str(tiny / "vision"), arch={"hidden_size": 999})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_language_model(str(tiny / "llm"), arch={"num_hidden_layers": TINY_LLM["num_hidden_layers"] + 1})


def test_partial_checkpoint_is_an_error_not_a_random_init(tmp_path, tiny, offline):
    broken = tmp_path / "vision"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny / "vision/config.json").read_bytes())
    weights = _state(tiny / "vision")
    del weights["post_layernorm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*post_layernorm.weight"):
        load_vision_backbone(str(broken))


def test_naflex_and_foreign_vision_checkpoints_are_errors(tmp_path, tiny, offline):
    Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2).save_pretrained(tmp_path / "naflex")
    with pytest.raises(ConfigError, match="NaFlex"):
        load_vision_backbone(str(tmp_path / "naflex"))
    with pytest.raises(ConfigError, match="model_type 'qwen3'"):
        load_vision_backbone(str(tiny / "llm"))


def test_tokenizer_without_vision_tokens_is_an_error(tmp_path, tiny, offline):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, IM_END: 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", chat_template="{{ 'x' }}")
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"tok.*<\|image_pad\|>"):
        load_tokenizer(str(tmp_path / "tok"))


def test_llm_arch_may_not_set_vocab_size(tmp_path, corpus):
    with pytest.raises(ConfigError, match="vocab_size"):
        materialize_tiny_models(tmp_path / "m", corpus, llm_arch={**TINY_LLM, "vocab_size": 10})


def test_cli_materialize(tmp_path, corpus):
    data = corpus[0].parent
    assert main(["materialize", "--data-dir", str(data), "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert json.loads((tmp_path / "m/materialize.json").read_text())["seed"] == 3
    assert main(["materialize", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "n")]) == 2
    assert not (tmp_path / "n").exists()


def test_corpus_without_annotation_column_is_an_error(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("url,query,caption\na.png,furniture,a chair\n", encoding="utf-8")
    with pytest.raises(InputError, match="train.csv.*annotation"):
        materialize_tiny_models(tmp_path / "m", [bad])
