"""AutoJudge (Garipov et al. 2025, "AutoJudge: Judge Decoding Without Manual Annotation"): lossy speculative
decoding where a trained judge lets *unimportant* draft/target mismatches through.

Greedy, as in the paper. Each cycle:

    Step 1  the draft proposes k tokens d_1..d_k greedily (and is fed d_k too, for its hidden state);
    Step 2  the target scores all of them in one forward: t_i = argmax p_i, hidden states h_i at each d_i;
    Step 3  left to right: d_i == t_i -> accept; d_i != t_i -> the judge scores the mismatch from the draft's
            and the target's final-layer hidden states at d_i; P(important) < threshold -> keep d_i (a
            "judge-accepted" token) and go on, else emit t_i and end the cycle;
    Step 4  all k kept -> also emit the bonus t_{k+1} (the target already conditioned on the kept drafts).

Steps 1, 2 and the caches' part of step 4 are the chain stages of :mod:`src.decoding.chain`, shared with
speculative sampling: only the decision at a mismatch differs. With a judge that never lets anything through,
the output is exactly greedy speculative decoding's (and the target's greedy output). Per cycle we also count
what exact speculative decoding would have accepted (the leading exact matches), so records show the judge's
gain on the same cycles.
"""

from __future__ import annotations

from typing import Any

import torch

from src.decoding.base import DecodingMethod, GenerationState, input_device, shared_vocab
from src.decoding.chain import check_chain_length, commit_chain, verify_chain
from src.decoding.drafters import ModelDrafter
from src.decoding.sampling import SamplingConfig
from src.decoding.stats import Generation
from src.decoding.timing import drafting
from src.errors import InvalidParameterError
from src.models.judge import Judge

GREEDY = SamplingConfig()  # AutoJudge drafts and verifies greedily, as in the paper


class AutoJudge(DecodingMethod):
    """Speculative greedy decoding with a mismatch judge.

    Args:
        k: draft tokens per target call.
        judge_path: the exported judge (``<path>.safetensors`` + ``<path>.json``, written by
            ``python -m src fit --config configs/autojudge.yaml``); None = the module's default path.
        threshold: let a mismatch through when P(important) < threshold; None = the threshold chosen at fit time
            (the largest keeping validation recall of important mismatches at the configured target).
    """

    name = "autojudge"
    needs_draft = True
    lossless = False  # the judge lets some mismatches through

    def __init__(self, k: int = 4, judge_path: str | None = None, threshold: float | None = None) -> None:
        check_chain_length(k)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidParameterError(f"threshold={threshold} is invalid: use a probability in [0, 1] or null")
        self.k = k
        self.judge_path = judge_path
        self.threshold = threshold
        self.judge: Judge | None = None  # set by prepare() or directly (tests)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "threshold": self.threshold, "judge_path": self.judge_path}

    def verify_width(self) -> int:
        return self.k + 1

    def input_files(self) -> list[str]:
        return [f"{self.judge_path}.safetensors", f"{self.judge_path}.json"] if self.judge_path else []

    def prepare(self, target_info: dict[str, Any], draft_info: dict[str, Any] | None) -> None:
        if self.judge_path is None:
            raise InvalidParameterError("autojudge needs judge_path: set it, or use the AutoJudge module's judge_path")
        self.judge = Judge.load(self.judge_path)
        self.judge.check_pair(target_info, draft_info)

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.judge.threshold

    @torch.inference_mode()
    def generate(self, target, draft, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: set[int], generator: torch.Generator | None = None) -> Generation:
        state = GenerationState(input_ids, max_new_tokens, eos_token_ids)
        if not sampling.greedy:
            raise InvalidParameterError(
                f"autojudge is greedy (as in the paper) but temperature={sampling.temperature}: set temperature 0"
            )
        if draft is None or self.judge is None:
            raise InvalidParameterError("autojudge needs a draft model and a loaded judge (prepare() loads it)")
        state.stats.extra.update(judge_accepted=0, exact_accepted_tokens=0)  # summed by every cycle
        vocab = shared_vocab(target, draft)  # argmaxes on the shared ids only (see chain.py)
        drafter = ModelDrafter(hidden_states=True)  # the judge reads the draft's state at each drafted token
        drafter.begin(draft, vocab, input_device(draft))

        # Prefill: the first cycle; both models read the prompt in its forwards (no separate prefill forward).
        with state.prefill():
            self.cycle(state, target, drafter, vocab)

        # Decode: one cycle per target forward until EOS or max_new_tokens.
        with state.decode():
            while not state.done:
                self.cycle(state, target, drafter, vocab)

        stats = state.stats
        cycles = len(stats.accepted_per_step)
        stats.extra["accepted_per_cycle_mean"] = stats.accepted_tokens / cycles if cycles else None
        stats.extra["exact_accepted_per_cycle_mean"] = stats.extra["exact_accepted_tokens"] / cycles if cycles else None
        return state.result()

    def cycle(self, state: GenerationState, target, drafter: ModelDrafter, vocab: int) -> int:
        """Steps 1-4 once; returns the drafts kept (exact matches and judge-accepted mismatches)."""
        committed = len(state.sequence)
        k = min(self.k, state.room - 1)  # a cycle emits at most k + 1 tokens
        # Step 1: the draft proposes d_1..d_k greedily, with its hidden state at each.
        with drafting():
            proposal = drafter.propose(state.sequence, k, GREEDY, None)
        # Step 2: one target forward: t_i = argmax p_i and the target's hidden state at each d_i.
        verified = verify_chain(target, state.target_cache, state.sequence, proposal.tokens, vocab, with_hidden=True)
        # Steps 3-4: the judge decides at each mismatch; emit the kept drafts and the token after them.
        kept, token, judged, exact = self.judge_cycle(
            proposal.tokens.tolist(), verified.logits.argmax(-1), proposal.hidden, verified.hidden[1:]
        )
        state.emit([*proposal.tokens[:kept].tolist(), token])
        commit_chain(state.target_cache, drafter, committed, verified, kept)
        state.record_cycle(proposal.forwards, k, kept)
        state.stats.extra["judge_accepted"] += judged
        state.stats.extra["exact_accepted_tokens"] += exact
        return kept

    # ---------------------------------------------------------------- stages

    def judge_cycle(
        self, drafts: list[int], target_choice: torch.Tensor, draft_hidden: torch.Tensor, target_hidden: torch.Tensor
    ) -> tuple[int, int, int, int]:
        """Steps 3-4: (drafts kept, token emitted after them, mismatches let through, exact-rule acceptance)."""
        choice = target_choice.tolist()
        exact = next((i for i, (d, t) in enumerate(zip(drafts, choice)) if d != t), len(drafts))
        kept = judged = 0
        for i, (d, t) in enumerate(zip(drafts, choice)):
            if d != t:
                important = float(self.judge.score(draft_hidden[i : i + 1], target_hidden[i : i + 1])[0])
                if important >= self.effective_threshold:
                    return kept, t, judged, exact
                judged += 1
            kept += 1
        return kept, choice[len(drafts)], judged, exact
