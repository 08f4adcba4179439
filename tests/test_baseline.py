"""Target-only decoding on tiny random Llama models: equals transformers' generate, stops where it must."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from src.decoding import Baseline, SamplingConfig
from src.decoding.sampling import make_generator


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama(seed=0)


PROMPTS = [[1, 5, 9, 33], [1, 100, 7], [1] + list(range(10, 60))]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_hf_generate(tiny_llama, prompt):
    input_ids = torch.tensor([prompt])
    generation = Baseline().generate(tiny_llama, None, input_ids, 24, SamplingConfig(), eos_token_ids=set())
    reference = tiny_llama.generate(input_ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert generation.tokens == reference[0, len(prompt):].tolist()
    assert generation.stats.target_calls == 24 and generation.tokens_per_target_call == 1.0
    assert generation.stats.prefill_s > 0 and generation.stats.decode_s > 0


def test_stops_right_after_eos(tiny_llama):
    input_ids = torch.tensor([PROMPTS[0]])
    free = Baseline().generate(tiny_llama, None, input_ids, 16, SamplingConfig(), eos_token_ids=set())
    eos = free.tokens[5]
    stopped = Baseline().generate(tiny_llama, None, input_ids, 16, SamplingConfig(), eos_token_ids={eos})
    first = free.tokens.index(eos)
    assert stopped.tokens == free.tokens[: first + 1] and stopped.stopped_by == "eos"


def test_max_new_tokens_one(tiny_llama):
    generation = Baseline().generate(tiny_llama, None, torch.tensor([PROMPTS[1]]), 1, SamplingConfig(), set())
    assert len(generation.tokens) == 1 and generation.stats.target_calls == 1


def test_sampling_is_reproducible_per_seed(tiny_llama):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50)
    input_ids = torch.tensor([PROMPTS[0]])
    runs = [Baseline().generate(tiny_llama, None, input_ids, 20, sampling, set(), make_generator(seed)).tokens
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_arguments_are_named(tiny_llama):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Baseline().generate(tiny_llama, None, torch.tensor([[1, 2]]), 0, SamplingConfig(), set())
    with pytest.raises(ValueError, match=r"shape \(1, prompt_len>0\)"):
        Baseline().generate(tiny_llama, None, torch.tensor([1, 2]), 4, SamplingConfig(), set())
