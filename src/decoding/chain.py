"""One draft-then-verify chain cycle, shared by speculative sampling, AutoJudge and AutoJudge's label mining.

    Step 1  propose  x_1..x_n (n <= k) from the drafter, with the q they were drawn from
    Step 2  verify   one target forward over the committed tokens the target has not cached + x_1..x_n;
                     row 0 of its logits is the target's next-token distribution after the last committed token,
                     row i the one after x_i (n + 1 rows)
    Step 3  decide   a rule maps (proposal, verified rows) to (a = drafts kept, the token emitted after them):
                     speculative sampling's exact rule, AutoJudge's judge, or plain greedy agreement
    Step 4  commit   sequence += x_1..x_a + token, stopping right after an EOS; the target cache and the drafter
                     keep the committed tokens + x_1..x_a, and the newest token is fed at the next cycle

The first cycle of a generation encodes the prompt in the same forwards (no separate prefill), as HF assisted
generation does. All rows are sliced to the ids both models share, ``[0, vocab)``: models of one family may pad
their output layers differently (Qwen2.5 0.5B: 151936, 7B: 152064), and a token from a padded range must never
be emitted nor fed to the other model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.decoding.base import input_device, model_logits, model_logits_and_hidden
from src.decoding.drafters import Drafter, Proposal
from src.decoding.kv import cache_length, truncate_cache
from src.decoding.sampling import SamplingConfig
from src.decoding.timing import drafting


@dataclass
class Verified:
    """The target's view of a proposal: ``logits`` (n + 1, vocab) after the last committed token and after each
    drafted token; ``hidden`` (n + 1, H) the final-norm hidden states at those positions, and ``features``
    (m + n, H) those of every position the forward read (the m unseen committed tokens first), when asked for;
    with ``feature_layers`` (an EAGLE-3 head's aux layers) ``features`` is (m + n, len(layers) * H) instead."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None

@dataclass
class Cycle:
    """What one cycle did: the proposal, the target's rows, how many drafts were kept and what was emitted."""

    proposal: Proposal
    verified: Verified
    accepted: int
    emitted: list[int]


# A rule: (proposal, verified) -> (drafts accepted, the token emitted after them).
Rule = Callable[[Proposal, Verified], tuple[int, int]]


def verify(
    target, cache, sequence: list[int], drafts: torch.Tensor, vocab: int, with_hidden: bool = False,
    feature_layers: tuple[int, ...] | None = None,
) -> Verified:
    """Step 2: one target forward over the unseen committed tokens + the n drafts; keeps the last n + 1 rows."""
    device = input_device(target)
    unseen = torch.tensor([sequence[cache_length(cache) :]], device=device)  # (1, m >= 1)
    step_input = torch.cat([unseen, drafts.to(device)[None]], dim=1)  # (1, m + n)
    keep = drafts.numel() + 1
    if feature_layers is not None:  # EAGLE-3: the aux layers' states of the same forward
        logits, hidden, features = model_logits_and_hidden(target, step_input, cache, logits_to_keep=keep,
                                                           feature_layers=feature_layers)
        return Verified(logits[0, -keep:, :vocab], hidden[0, -keep:], features[0])  # ..., (m + n, 3H)
    if with_hidden:
        logits, hidden = model_logits_and_hidden(target, step_input, cache, logits_to_keep=keep)
        # (n + 1, vocab), (n + 1, H), (m + n, H)
        return Verified(logits[0, -keep:, :vocab], hidden[0, -keep:], hidden[0])
    logits = model_logits(target, step_input, cache, logits_to_keep=keep)  # (1, n + 1, vocab_p)
    return Verified(logits[0, -keep:, :vocab])


def greedy_rule(proposal: Proposal, verified: Verified) -> tuple[int, int]:
    """Keep drafts while each equals the target's argmax; emit the target's argmax after them (exact under greedy
    decoding, whatever proposed the drafts)."""
    choice = verified.logits.argmax(-1)  # (n + 1,)
    drafts = proposal.tokens.to(choice.device)
    accepted = int((drafts == choice[: drafts.numel()]).long().cumprod(0).sum())
    return accepted, int(choice[accepted])


def chain_cycle(
    target,
    cache,
    drafter: Drafter,
    sequence: list[int],
    k: int,
    vocab: int,
    rule: Rule,
    eos_token_ids: set[int],
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    stop_below: float = 0.0,
    with_hidden: bool = False,
) -> Cycle:
    """Steps 1-4 once on ``sequence`` (prompt + committed tokens, extended in place)."""
    committed, seen = len(sequence), cache_length(cache)
    # Step 1: propose up to k tokens.
    with drafting():
        proposal = drafter.propose(sequence, k, sampling, generator, stop_below)
    # Step 2: one target forward scores every drafted position (and encodes what it has not seen).
    with_hidden = with_hidden or drafter.needs_target_features
    verified = verify(target, cache, sequence, proposal.tokens, vocab, with_hidden, drafter.feature_layers)
    # Step 3: the rule decides how many drafts stay and which token follows them.
    accepted, token = rule(proposal, verified)
    # Step 4: emit, stopping right after an EOS; cut the target cache and the drafter back to what was kept.
    emitted = []
    for new in [*proposal.tokens[:accepted].tolist(), token]:
        sequence.append(new)
        emitted.append(new)
        if new in eos_token_ids:
            break
    truncate_cache(cache, committed + accepted)
    with drafting():
        if drafter.needs_target_features:  # the features of every position now committed and cached
            drafter.commit(committed + accepted, verified.features[: committed - seen + accepted])
        else:
            drafter.commit(committed + accepted)
    return Cycle(proposal, verified, accepted, emitted)
