"""AutoJudge label mining (after Garipov et al. 2025, Algorithm 1) and the label store it writes.

For a prompt with a checkable final answer:

    R <- the target's greedy answer;  reference <- answer(R)
    teacher-force the draft over prompt + R:  mismatches = {i : draft_argmax_i != R_i}
    for each mismatch i (up to ``max_mismatches``, a seeded sample when there are more):
        R' <- R[:i] + [draft token] + the target's greedy continuation
        answer(R') == reference  ->  UNIMPORTANT (label 0);  otherwise IMPORTANT (label 1)

The paper's Algorithm 1 visits the mismatches in order and, after an unimportant one, continues on R' (the
draft's version). Here every mismatch is labelled against the target's own R, so the continuations are
independent and run side by side (:mod:`src.decoding.branches`): the answers of a group of prompts in one
batch of branches, then every continuation of the group in another, each fork reading its prefix from one
shared prefill. A forward over 64 tokens costs ~3x one over 1 token on a CPU, so this mines several times more
labels per minute than continuing one mismatch at a time; the labelled contexts are the target's own prefixes.

Features of a mismatch (the paper's default): the final-layer hidden states (after the final norm) of the
draft and of the target reading the draft token, on the sequence ``prompt + R[:i] + [draft token]``. A cheap
extra set is kept per label (:data:`STATS_FEATURES`: probabilities of both tokens under p = target and
q = draft, entropies, position), also what the trivial judges of the evaluation score with.

Store layout (``store_dir``): ``meta.json`` (models and settings), ``shards/<prompt>.safetensors`` (features
of one prompt), ``labels.jsonl`` (one row per mismatch) and ``prompts.jsonl`` (one row per finished prompt,
written last: a prompt without it is mined again, so a killed run resumes where it stopped).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.data.progress import QUICK_PHASE_DELAY_S, phase_progress
from src.decoding.base import vocab_width
from src.decoding.branches import BranchDecoder, greedy_answers
from src.decoding.sampling import SamplingConfig, logits_to_probs
from src.jsonl import append_rows, guard_meta, read_meta, read_rows, repair_lines
from src.models.judge import STATS_FEATURES, LabelSet

log = logging.getLogger(__name__)

IMPORTANT, UNIMPORTANT = 1, 0
LOOP_WINDOW = 32  # a greedy output repeating a window this long is looping (src.decoding.branches.BranchDecoder)

# The cheap per-label features, in this order (p = target, q = draft, both at temperature 1, on the teacher-
# forced answer R): p of the target's token (its top-1 probability, R being greedy), p of the draft's token,
# q of the draft's token, q of the target's token, the entropies of p and q, and the mismatch's place in R.
@dataclass
class Mismatch:
    position: int  # index in the answer R (0 = first generated token)
    draft_token: int
    target_token: int
    label: int  # IMPORTANT or UNIMPORTANT
    draft_hidden: torch.Tensor  # (Hd,)
    target_hidden: torch.Tensor  # (Ht,)
    stats: dict[str, float] = field(default_factory=dict)  # STATS_FEATURES
    continuation_tokens: int = 0  # tokens the target generated after the draft token


@dataclass
class MinedPrompt:
    reference_answer: str | None
    answer_tokens: list[int]  # R
    mismatches: list[Mismatch] = field(default_factory=list)
    found: int = 0  # mismatches in R (the labelled ones are a sample of at most max_mismatches)
    stopped_by: str = "labelled"  # or "no_mismatch", "no_answer", "unfinished"


@dataclass
class _Pending:
    """A prompt whose answer has a reference and mismatches: what the continuations need."""

    prompt: list[int]
    result: MinedPrompt
    positions: list[int]  # of the labelled mismatches in R
    draft_tokens: list[int]
    q_rows: torch.Tensor  # (m, V) the draft's logits there
    draft_forks: list  # the draft's branches reading each draft token (their hidden states)
    stats: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------- one group of prompts


def mine_prompts(
    target,
    draft,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_ids: set[int],
    answer_of: Callable[[list[int]], str | None],
    max_mismatches: int = 16,
    seeds: list[int] | None = None,
    skip_unfinished: bool = True,
    fork_batch: int = 64,
) -> list[MinedPrompt]:
    """Label the draft/target mismatches of a group of prompts (module docstring), decoded side by side.

    ``answer_of`` maps answer tokens to the final answer (None when there is none). ``seeds`` pick each prompt's
    sample when it has more than ``max_mismatches`` mismatches (None: the first ones). ``skip_unfinished``: give
    up on a prompt whose answer is cut by ``max_new_tokens`` before an EOS: the last number of a cut answer is a
    reasoning step, not a final answer, and would make every mismatch look important. ``fork_batch``: mismatch
    continuations decoded side by side at most (the forward's width).
    """
    # Step 1: R = the target's greedy answer of every prompt; its final answer is the reference.
    answers = greedy_answers(target, prompts, max_new_tokens, eos_token_ids, LOOP_WINDOW)
    results = [MinedPrompt(answer_of(answer), answer) for answer in answers]
    candidates = []
    for index, result in enumerate(results):
        if skip_unfinished and result.answer_tokens[-1] not in eos_token_ids:
            result.stopped_by = "unfinished"
        elif result.reference_answer is None:
            result.stopped_by = "no_answer"
        else:
            candidates.append(index)
    if not candidates:
        return results
    # Step 2: teacher-force the draft over every prompt + R; its disagreements are the mismatches. The draft
    # reads each mismatch's draft token in one more forward (its hidden state there, a feature).
    shared_vocab = min(vocab_width(target), vocab_width(draft))  # a padded draft id must never reach the target
    sequences = [prompts[i] + results[i].answer_tokens for i in candidates]
    draft_decoder = BranchDecoder(draft, eos_token_ids)
    draft_logits, _ = draft_decoder.prefill(sequences)
    pending: list[tuple[int, _Pending]] = []
    offset = 0
    for sequence_index, i in enumerate(candidates):
        prompt, answer = prompts[i], results[i].answer_tokens
        # The logit row at sequence position len(prompt) - 1 + j predicts answer[j].
        start = offset + len(prompt) - 1
        offset += len(prompt) + len(answer)
        predicted = draft_logits[start : start + len(answer), :shared_vocab].argmax(-1).tolist()
        found = [j for j, (d, r) in enumerate(zip(predicted, answer)) if d != r]
        results[i].found = len(found)
        if not found:
            results[i].stopped_by = "no_mismatch"
            continue
        if len(found) > max_mismatches:
            found = sorted(random.Random(seeds[i]).sample(found, max_mismatches)) if seeds else found[:max_mismatches]
        tokens = [predicted[j] for j in found]
        forks = [draft_decoder.fork(sequence_index, len(prompt) + j, t, 0) for j, t in zip(found, tokens)]
        q_rows = draft_logits[[start + j for j in found], :shared_vocab]
        pending.append((sequence_index, _Pending(prompt, results[i], found, tokens, q_rows, forks)))
    draft_decoder.run()
    # Steps 3-4: the target continues every mismatch, ``fork_batch`` side by side, and each is labelled.
    for batch in _fork_batches(pending, fork_batch):
        _label_forks(target, batch, [sequences[i] for i, _ in batch], max_new_tokens, eos_token_ids, answer_of,
                     shared_vocab)
    return results


def _fork_batches(pending: list[tuple[int, _Pending]], fork_batch: int) -> list[list[tuple[int, _Pending]]]:
    """Consecutive prompts whose mismatches add up to at most ``fork_batch`` (a prompt with more goes alone)."""
    batches, current, width = [], [], 0
    for entry in pending:
        forks = len(entry[1].positions)
        if current and width + forks > fork_batch:
            batches.append(current)
            current, width = [], 0
        current.append(entry)
        width += forks
    return batches + ([current] if current else [])


def continuation_budget(answer_length: int, position: int, max_new_tokens: int) -> int:
    """Tokens the target may generate after a draft token at ``position``: the rest of ``max_new_tokens``, but
    at most twice what R itself needed after that point plus 16. A continuation still running then has left
    R's final answer behind (it is labelled important) and would hold every other branch's step count."""
    rest = answer_length - position - 1
    return min(max_new_tokens - position - 1, 2 * rest + 16)


def _label_forks(target, batch, sequences, max_new_tokens, eos_token_ids, answer_of, shared_vocab) -> None:
    """Steps 3-4 for the prompts of ``batch``: the target reads every draft token and continues greedily to an
    EOS or :func:`continuation_budget`; same final answer as R -> unimportant, else important."""
    decoder = BranchDecoder(target, eos_token_ids, LOOP_WINDOW)
    target_logits, _ = decoder.prefill(sequences)
    forks, offset = [], 0
    for sequence_index, (_, item) in enumerate(batch):
        answer = item.result.answer_tokens
        p_rows = target_logits[[offset + len(item.prompt) - 1 + j for j in item.positions], :shared_vocab]
        offset += len(sequences[sequence_index])
        item.stats = mismatch_stats(p_rows, item.q_rows, torch.tensor(item.draft_tokens),
                                    torch.tensor(answer)[item.positions], item.positions, len(answer))
        for position, token in zip(item.positions, item.draft_tokens):
            budget = 0 if token in eos_token_ids else continuation_budget(len(answer), position, max_new_tokens)
            forks.append((decoder.fork(sequence_index, len(item.prompt) + position, token, budget), budget))
    decoder.run()
    forks = iter(forks)
    for _, item in batch:
        answer = item.result.answer_tokens
        for position, token, stats, draft_fork in zip(item.positions, item.draft_tokens, item.stats, item.draft_forks):
            target_fork, budget = next(forks)
            tail = target_fork.tokens
            # A continuation that loops, or still runs at twice R's length, has left R's final answer behind:
            # important. (One cut by max_new_tokens itself is read like R: only with skip_unfinished off.)
            capped = len(tail) >= budget and budget < max_new_tokens - position - 1
            same = (not target_fork.looped and not capped
                    and answer_of(answer[:position] + [token] + tail) == item.result.reference_answer)
            item.result.mismatches.append(Mismatch(position, token, answer[position], UNIMPORTANT if same else IMPORTANT,
                                                   draft_fork.hidden, target_fork.hidden, stats, len(tail)))


def mismatch_stats(
    p_logits: torch.Tensor, q_logits: torch.Tensor, draft_tokens: torch.Tensor, target_tokens: torch.Tensor,
    positions: list[int], answer_length: int,
) -> list[dict[str, float]]:
    """:data:`STATS_FEATURES` of m mismatches from the target's (p) and draft's (q) logit rows (m, V)."""
    plain = SamplingConfig(temperature=1.0)
    p, q = logits_to_probs(p_logits.float(), plain), logits_to_probs(q_logits.float(), plain)
    rows = torch.arange(len(positions))
    columns = {
        "p_target_token": p[rows, target_tokens], "p_draft_token": p[rows, draft_tokens],
        "q_draft_token": q[rows, draft_tokens], "q_target_token": q[rows, target_tokens],
        "entropy_p": -(p * p.clamp_min(1e-30).log()).sum(-1), "entropy_q": -(q * q.clamp_min(1e-30).log()).sum(-1),
        "position": torch.tensor(positions, dtype=torch.float32),
        "position_share": torch.tensor(positions, dtype=torch.float32) / answer_length,
    }
    return [{name: round(float(columns[name][m]), 6) for name in STATS_FEATURES} for m in range(len(positions))]


# ---------------------------------------------------------------- the store


class LabelStore:
    """Append-only store of mined labels (module docstring); safetensors for tensors, JSONL for the rest."""

    kind = "AutoJudge label store"  # how messages name it (e.g. what a stopped fit keeps)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def exists(self) -> bool:
        return self.meta_path.is_file() and bool(self.finished_prompts())

    @property
    def prompts_path(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.jsonl"

    def open(self, meta: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was mined with the same models and settings; move the
        lines a killed run cut aside (src.jsonl.repair_lines), so this run's rows never join a fragment."""
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        guard_meta(self.meta_path, meta, f"label store {self.root} was mined", "delete it or choose another store_dir")
        for path in (self.prompts_path, self.labels_path):
            repair_lines(path)

    def meta(self) -> dict[str, Any]:
        return read_meta(self.meta_path)

    def finished_prompts(self) -> dict[str, dict[str, Any]]:
        """prompt id -> its row in ``prompts.jsonl``, for prompts whose every label row is there too."""
        return self._finished(self._label_rows())

    def _label_rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(prompt id, row) -> label row; a prompt mined twice (killed after its labels, before its prompt row)
        keeps its last rows."""
        return {(r["prompt_id"], r["row"]): r for r in read_rows(self.labels_path)}

    def _finished(self, label_rows: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # A cut label line moved aside (src.jsonl) leaves its prompt short of a label: mined again, not lost.
        labelled: dict[str, int] = {}
        for prompt_id, _ in label_rows:
            labelled[prompt_id] = labelled.get(prompt_id, 0) + 1
        prompts = {row["prompt_id"]: row for row in read_rows(self.prompts_path)}
        return {prompt_id: row for prompt_id, row in prompts.items()
                if labelled.get(prompt_id, 0) >= row.get("mismatches", 0)}

    def add(self, prompt_id: str, mined: MinedPrompt, seconds: float) -> None:
        """Write one prompt: features shard, label rows, then the prompt row that marks it finished."""
        from safetensors.torch import save_file

        shard = f"shards/{hashlib.sha1(prompt_id.encode()).hexdigest()[:16]}.safetensors"
        if mined.mismatches:
            save_file({
                "draft_hidden": torch.stack([m.draft_hidden for m in mined.mismatches]).contiguous(),
                "target_hidden": torch.stack([m.target_hidden for m in mined.mismatches]).contiguous(),
            }, str(self.root / shard))
        append_rows(self.labels_path, [{
            "prompt_id": prompt_id, "position": m.position, "draft_token": m.draft_token,
            "target_token": m.target_token, "label": m.label, "shard": shard, "row": row,
            "continuation_tokens": m.continuation_tokens, "stats": m.stats,
        } for row, m in enumerate(mined.mismatches)])
        append_rows(self.prompts_path, [{  # written last: it marks the prompt finished
            "prompt_id": prompt_id, "reference_answer": mined.reference_answer, "stopped_by": mined.stopped_by,
            "mismatches": len(mined.mismatches), "important": sum(m.label for m in mined.mismatches),
            "found": mined.found, "answer_tokens": len(mined.answer_tokens), "seconds": round(seconds, 3),
        }])

    def load(self, show_progress: bool = True) -> LabelSet:
        """Every label of a finished prompt (rows of an unfinished prompt, from a killed run, are ignored).
        ``show_progress``: a bar over the labels, should reading their shards take a while."""
        from safetensors.torch import load_file

        label_rows = self._label_rows()
        finished = self._finished(label_rows)
        rows = [r for r in label_rows.values() if r["prompt_id"] in finished]
        shards: dict[str, dict[str, torch.Tensor]] = {}
        draft, target = [], []
        # one shard per prompt: seconds for thousands of prompts (configs/autojudge-long.yaml mines 7,473)
        with phase_progress("reading AutoJudge labels", len(rows), unit="label", enabled=show_progress,
                            delay_s=QUICK_PHASE_DELAY_S) as bar:
            for r in rows:
                if r["shard"] not in shards:
                    shards[r["shard"]] = load_file(str(self.root / r["shard"]))
                draft.append(shards[r["shard"]]["draft_hidden"][r["row"]])
                target.append(shards[r["shard"]]["target_hidden"][r["row"]])
                bar.update()
        if not rows:
            return LabelSet(torch.empty(0, 0), torch.empty(0, 0), torch.empty(0), [], [])
        stats = None
        if all(r.get("stats") for r in rows):
            stats = torch.tensor([[r["stats"][name] for name in STATS_FEATURES] for r in rows], dtype=torch.float32)
        return LabelSet(
            torch.stack(draft), torch.stack(target), torch.tensor([r["label"] for r in rows], dtype=torch.float32),
            [r["prompt_id"] for r in rows], rows, stats,
        )
