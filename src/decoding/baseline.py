"""Target-only autoregressive decoding with a KV cache: the reference every other method is measured against."""

from __future__ import annotations

import torch

from src.decoding.base import DecodingMethod, GenerationState, model_logits
from src.decoding.sampling import SamplingConfig, next_token
from src.decoding.stats import Generation


class Baseline(DecodingMethod):
    """Plain decoding from the target: one target forward per new token (tokens per target call = 1.0)."""

    name = "baseline"

    @torch.inference_mode()
    def generate(self, target, draft, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: set[int], generator: torch.Generator | None = None) -> Generation:
        state = GenerationState(input_ids, max_new_tokens, eos_token_ids)

        # Prefill: one forward over the prompt draws the first token from p(. | prompt).
        with state.prefill():
            logits = model_logits(target, input_ids, state.target_cache, logits_to_keep=1)  # (1, 1, vocab)
            state.stats.target_calls += 1
            state.emit([next_token(logits[0, -1], sampling, generator)])

        # Decode: one target forward per further token, feeding only the newest token (the cache holds the rest).
        with state.decode():
            while not state.done:
                step_input = torch.tensor([[state.sequence[-1]]], device=state.device)  # (1, 1)
                logits = model_logits(target, step_input, state.target_cache)  # (1, 1, vocab)
                state.stats.target_calls += 1
                state.emit([next_token(logits[0, -1], sampling, generator)])
        return state.result()
