"""Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

Each step the draft proposes a chain of ``k`` tokens x_1..x_k ~ q, the target scores all k + 1 positions in
one forward, and the chain is accepted left to right:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
    at the first rejection i:  emit x ~ normalize(max(0, p_i - q_i))   (the residual distribution)
    if all k are accepted:     emit a bonus x ~ p_{k+1}

which makes every emitted token distributed exactly as under plain sampling from p (lossless). In greedy mode
(temperature 0) p and q are one-hot, so this is "accept while draft token == target argmax, then emit the
target argmax", done without random draws.

Cache bookkeeping: ``sequence`` holds prompt + emitted tokens. Each model's cache holds a prefix of it; the
tokens after that prefix (at least the newest token, plus the last draft token when a whole chain was
accepted) are fed at the start of the next forward. After a verification both caches are cut back to the
committed tokens with :func:`src.decoding.kv.truncate_cache`.
"""

from __future__ import annotations

import torch

from src.decoding.base import DecodingMethod, check_generate_args, input_device, model_logits
from src.decoding.kv import cache_length, new_cache, truncate_cache
from src.decoding.sampling import SamplingConfig, logits_to_probs, residual_distribution, sample
from src.decoding.stats import Generation, GenerationStats, StageTimer


def draw(probs: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from ``probs`` (vocab,): the argmax when greedy (no random draw), else a sample."""
    return int(probs.argmax()) if sampling.greedy else int(sample(probs, generator))


class SpeculativeSampling(DecodingMethod):
    """Draft a chain of ``k`` tokens, verify it with one target forward, keep the accepted prefix + one token.

    Args:
        k: draft tokens proposed per target forward (fewer near ``max_new_tokens``, never more than needed).

    Statistics: ``record_step(drafted, accepted)`` once per target verification after the prefill, with
    ``drafted`` = the chain length of that step (0 for a plain target step at the very end) and ``accepted`` =
    how many of them the rule accepted (also counted when an EOS among them ends the output early).
    Without EOS: ``len(tokens) == 1 + accepted_tokens + len(accepted_per_step)`` and
    ``target_calls == 1 + len(accepted_per_step)``.
    """

    name = "speculative"
    needs_draft = True

    def __init__(self, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k={k} is invalid: use k >= 1 draft tokens per target call")
        self.k = k

    def params(self) -> dict[str, int]:
        return {"k": self.k}

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
        if draft is None:
            raise ValueError("draft=None: speculative sampling needs a draft model (set one in the model pair)")
        stats = GenerationStats()
        device = input_ids.device  # the target's input device (as in Baseline)
        draft_device = input_device(draft)
        target_cache, draft_cache = new_cache(), new_cache()
        sequence: list[int] = input_ids[0].tolist()  # prompt + emitted tokens
        prompt_len = len(sequence)

        # Step 1: prefill both models on the prompt; the first token comes from p(. | prompt).
        with StageTimer(device) as prefill:
            p_logits = model_logits(target, input_ids, target_cache, logits_to_keep=1)[0, -1]  # (vocab_p,)
            q_logits = model_logits(draft, input_ids.to(draft_device), draft_cache, logits_to_keep=1)[0, -1]  # (vocab_q,)
            stats.target_calls += 1
            stats.draft_calls += 1
            # Models of one family may pad their lm_head differently (Qwen2.5 0.5B: 151936, 7B: 152064):
            # p and q live on the shared ids [0, vocab).
            vocab = min(p_logits.shape[-1], q_logits.shape[-1])
            sequence.append(draw(logits_to_probs(p_logits[:vocab], sampling), sampling, generator))
        stats.prefill_s = prefill.elapsed

        # Step 2: draft / verify / accept until EOS or max_new_tokens.
        with StageTimer(device) as decode:
            while len(sequence) - prompt_len < max_new_tokens and sequence[-1] not in eos_token_ids:
                # A step emits at most k_step + 1 tokens: never draft what could not be emitted.
                k_step = min(self.k, max_new_tokens - (len(sequence) - prompt_len) - 1)
                committed = len(sequence)
                drafts, q = self.draft_chain(
                    draft, draft_cache, sequence, k_step, vocab, sampling, generator, draft_device
                )
                stats.draft_calls += k_step
                p = self.verify(target, target_cache, sequence, drafts, vocab, sampling, device)
                stats.target_calls += 1
                accepted, token = self.accept(drafts, p, q, sampling, generator)
                stats.record_step(drafted=k_step, accepted=accepted)

                # Step 3: emit accepted drafts + the residual / bonus token, stopping right after an EOS.
                for new in [*drafts[:accepted].tolist(), token]:
                    sequence.append(new)
                    if new in eos_token_ids:
                        break
                # Step 4: caches keep committed + accepted drafts; the newest token is fed next step.
                truncate_cache(target_cache, committed + accepted)
                truncate_cache(draft_cache, committed + accepted)
        stats.decode_s = decode.elapsed

        tokens = sequence[prompt_len:]
        stopped_by = "eos" if tokens[-1] in eos_token_ids else "max_new_tokens"
        return Generation(tokens=tokens, stats=stats, stopped_by=stopped_by)

    # ---------------------------------------------------------------- stages

    def draft_chain(
        self,
        draft,
        cache,
        sequence: list[int],
        k: int,
        vocab: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k draft forwards: x_i ~ q_i; returns drafts (k,) long and q (k, vocab).

        The first forward also feeds every committed token the draft cache has not seen yet.
        """
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        step_input = sequence[cache_length(cache) :]  # >= 1 token: at least the newest one
        for _ in range(k):
            logits = model_logits(draft, torch.tensor([step_input], device=device), cache, logits_to_keep=1)[0, -1]
            q_i = logits_to_probs(logits[:vocab], sampling)  # (vocab,)
            drafts.append(draw(q_i, sampling, generator))
            q_rows.append(q_i)
            step_input = drafts[-1:]
        if not drafts:
            return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, vocab, device=device)
        return torch.tensor(drafts, device=device), torch.stack(q_rows)

    def verify(
        self,
        target,
        cache,
        sequence: list[int],
        drafts: torch.Tensor,
        vocab: int,
        sampling: SamplingConfig,
        device: torch.device,
    ) -> torch.Tensor:
        """One target forward over the unseen committed tokens + the k drafts; returns p (k + 1, vocab)."""
        unseen = torch.tensor([sequence[cache_length(cache) :]], device=device)  # (1, >= 1)
        step_input = torch.cat([unseen, drafts.to(device)[None]], dim=1)  # (1, unseen + k)
        logits = model_logits(target, step_input, cache, logits_to_keep=drafts.numel() + 1)[0, -(drafts.numel() + 1) :]  # (k + 1, vocab_p)
        return logits_to_probs(logits[:, :vocab], sampling)

    def accept(
        self,
        drafts: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """The acceptance rule: (number of drafts accepted, the token emitted after them).

        drafts (k,), p (k + 1, vocab), q (k, vocab).
        """
        k = drafts.numel()
        p = p.to(drafts.device)
        q = q.to(drafts.device)
        if sampling.greedy:
            # Step 1 (greedy): p and q are one-hot, min(1, p/q) is 1 iff x_i == argmax p_i, and the residual
            # of a rejection (and the bonus) is the target argmax itself.
            target_choice = p.argmax(-1)  # (k + 1,)
            accepted = int((drafts == target_choice[:k]).long().cumprod(0).sum())
            return accepted, int(target_choice[accepted])
        # Step 1: accept x_i iff u_i < p_i(x_i) / q_i(x_i), u_i ~ U[0, 1)  (written u_i * q_i < p_i: no division).
        p_x = p[:k].gather(-1, drafts[:, None]).squeeze(-1)  # (k,)
        q_x = q.gather(-1, drafts[:, None]).squeeze(-1)  # (k,)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(k, generator=generator, device=gen_device).to(drafts.device)  # (k,)
        accepted = int((u * q_x < p_x).long().cumprod(0).sum())
        # Step 2: first rejection at i -> x ~ normalize(max(0, p_i - q_i)); all accepted -> bonus x ~ p_{k+1}.
        if accepted < k:
            return accepted, int(sample(residual_distribution(p[accepted], q[accepted]), generator))
        return accepted, int(sample(p[k], generator))
