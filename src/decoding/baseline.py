"""Target-only autoregressive decoding with a KV cache: the reference every other method is measured against."""

from __future__ import annotations

import torch

from src.decoding.base import DecodingMethod, check_generate_args, model_logits
from src.decoding.kv import new_cache
from src.decoding.sampling import SamplingConfig, next_token
from src.decoding.stats import Generation, GenerationStats, StageTimer


class Baseline(DecodingMethod):
    """Plain decoding from the target: one target forward per new token (tokens per target call = 1.0)."""

    name = "baseline"

    @torch.inference_mode()
    def generate(
        self,
        target,
        draft,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingConfig,
        eos_token_ids: set[int],
        generator: torch.Generator | None = None,
    ) -> Generation:
        check_generate_args(input_ids, max_new_tokens)
        stats = GenerationStats()
        device = input_ids.device
        cache = new_cache()
        tokens: list[int] = []

        # Step 1: prefill the prompt and draw the first token from p(. | prompt).
        with StageTimer(device) as prefill:
            logits = model_logits(target, input_ids, cache, logits_to_keep=1)  # (1, 1, vocab)
            stats.target_calls += 1
            token = next_token(logits[0, -1], sampling, generator)
        stats.prefill_s = prefill.elapsed
        tokens.append(token)

        # Step 2: one target forward per further token, feeding only the newest token (the cache holds the rest).
        with StageTimer(device) as decode:
            while len(tokens) < max_new_tokens and token not in eos_token_ids:
                step_input = torch.tensor([[token]], device=device)
                logits = model_logits(target, step_input, cache)  # (1, 1, vocab)
                stats.target_calls += 1
                token = next_token(logits[0, -1], sampling, generator)
                tokens.append(token)
        stats.decode_s = decode.elapsed
        stopped_by = "eos" if tokens[-1] in eos_token_ids else "max_new_tokens"
        return Generation(tokens=tokens, stats=stats, stopped_by=stopped_by)
