"""Lossless methods reproduce the target's greedy output on the real embedded pair (fp32 target; bf16 and
nf4 drafts) for MT-Bench prompts at 64 new tokens.

On a mismatch the message gives the prompt, the first divergent index and the target's top-2 logit margin
there: tree / chunked verification changes float summation order, so a near-tie (margin ~1e-5) can flip
legitimately, while a real bug shows up with a large margin.
"""

from __future__ import annotations

import pytest
import torch
from conftest import chat_input_ids

from src.decoding import Baseline, SamplingConfig
from src.decoding.specexec import SpecExec
from src.decoding.speculative import SpeculativeSampling
from src.results.records import first_divergence

NEW_TOKENS = 64
PROMPTS = 5
METHODS = {
    "speculative-k4": SpeculativeSampling(k=4),
    "specexec-b16": SpecExec(budget=16, max_depth=8, max_beams=4, max_branch_width=4),
}


@pytest.fixture(scope="module")
def greedy_references(embedded_target, mt_bench_prompts):
    """(prompt id, input ids, baseline tokens) for the first turn of one prompt per MT-Bench category."""
    seen, cases = set(), []
    eos = {embedded_target.tokenizer.eos_token_id}
    for prompt in mt_bench_prompts:
        if prompt.category in seen:
            continue
        seen.add(prompt.category)
        input_ids = chat_input_ids(embedded_target.tokenizer, prompt.turns[0])
        tokens = Baseline().generate(embedded_target.model, None, input_ids, NEW_TOKENS, SamplingConfig(), eos).tokens
        cases.append((prompt.prompt_id, input_ids, tokens))
        if len(cases) == PROMPTS:
            break
    return cases


def top2_margin(model, input_ids: torch.Tensor, tokens: list[int], index: int) -> float:
    context = torch.cat([input_ids, torch.tensor([tokens[:index]], dtype=input_ids.dtype)], dim=1)
    with torch.inference_mode():
        logits = model(context).logits[0, -1]
    top2 = torch.topk(logits.float(), 2).values
    return float(top2[0] - top2[1])


# The nf4 draft runs bitsandbytes' slow CPU 4-bit kernels (~2 min per method): slow-marked, run by `make test-all`.
@pytest.mark.parametrize("draft_name", ["bf16", pytest.param("nf4", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_greedy_output_equals_baseline(method_name, draft_name, greedy_references, embedded_target, request):
    draft = request.getfixturevalue(f"embedded_draft_{draft_name}")
    method = METHODS[method_name]
    eos = {embedded_target.tokenizer.eos_token_id}
    failures = []
    for prompt_id, input_ids, expected in greedy_references:
        generation = method.generate(embedded_target.model, draft.model, input_ids, NEW_TOKENS, SamplingConfig(), eos)
        index = first_divergence(generation.tokens, expected)
        if index is not None:
            margin = top2_margin(embedded_target.model, input_ids, expected, index)
            failures.append(f"prompt {prompt_id}: first divergence at token {index}, target top-2 logit margin {margin:.2e}")
        assert generation.stats.target_calls <= len(generation.tokens)
    assert not failures, f"{method_name} with the {draft_name} draft:\n" + "\n".join(failures)
