"""The branch decoder: many greedy continuations in one KV cache equal the same continuations decoded alone."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from src.decoding import branches
from src.decoding.branches import BranchDecoder, greedy_answers
from src.errors import InvalidParameterError

EOS = {2}
PROMPTS = [[1, 17, 33, 5, 90], [1, 9, 9], [1, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=3)


@torch.no_grad()
def naive_greedy(model, prefix: list[int], n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n and (not out or out[-1] not in EOS):
        out.append(int(model(input_ids=torch.tensor([prefix + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("drop_share", [None, 1e-9])
def test_answers_side_by_side_equal_answers_alone(model, monkeypatch, drop_share):
    if drop_share is not None:  # drop finished rows at every step: the outputs must not change
        monkeypatch.setattr(branches, "DROP_SHARE", drop_share)
    eos = {int(naive_greedy(model, PROMPTS[1], 7)[-1])}  # the second prompt's answer ends at its 7th token
    answers = greedy_answers(model, PROMPTS, 30, eos)
    for prompt, answer in zip(PROMPTS, answers):
        out: list[int] = []
        while len(out) < 30 and (not out or out[-1] not in eos):
            with torch.no_grad():
                out.append(int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax()))
        assert answer == out
    assert len(answers[1]) <= 7 and max(len(a) for a in answers) == 30


@pytest.mark.parametrize("drop_share", [None, 1e-9])
def test_forks_read_their_prefix_only(model, monkeypatch, drop_share):
    if drop_share is not None:
        monkeypatch.setattr(branches, "DROP_SHARE", drop_share)
    answer = naive_greedy(model, PROMPTS[0], 30)
    decoder = BranchDecoder(model, EOS)
    logits, hidden = decoder.prefill([PROMPTS[2], PROMPTS[0] + answer])  # a second sequence beside it
    forks = [(3, 7, 20), (10, 11, 5), (0, 40, 25), (29, 50, 0)]  # (answer position, token, budget)
    started = [decoder.fork(1, len(PROMPTS[0]) + pos, token, budget) for pos, token, budget in forks]
    decoder.run()
    for (pos, token, budget), branch in zip(forks, started):
        prefix = PROMPTS[0] + answer[:pos] + [token]
        assert branch.tokens == naive_greedy(model, prefix, budget)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([prefix]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(branch.hidden, expected, atol=1e-4, rtol=1e-4)
    # the prefill's rows are each sequence's own causal forward
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([PROMPTS[0] + answer])).logits[0]
    torch.testing.assert_close(logits[len(PROMPTS[2]) :], alone, atol=1e-4, rtol=1e-4)
    assert hidden.shape == (len(PROMPTS[2]) + len(PROMPTS[0]) + 30, 64)


def test_a_looping_branch_stops_where_its_window_repeats(model):
    for prompt in ([1, 5, 5, 5], [1, 9, 9], [1, 17, 33]):
        full = naive_greedy(model, prompt, 60)
        [cut] = greedy_answers(model, [prompt], 60, EOS, loop_window=3)
        assert full[: len(cut)] == cut
        if len(cut) < len(full):  # stopped early: its last 3 tokens already occurred in it
            window = cut[-3:]
            assert any(cut[i : i + 3] == window for i in range(len(cut) - 3))
            assert not any(cut[j - 3 : j] == cut[i : i + 3] for j in range(4, len(cut)) for i in range(j - 3))
            return
    pytest.fail("no prompt looped within 60 tokens: pick prompts that do")


def test_misuse_is_refused(model):
    decoder = BranchDecoder(model, EOS)
    with pytest.raises(InvalidParameterError, match="non-empty"):
        decoder.prefill([[1, 2], []])
    decoder.prefill([[1, 2, 3]])
    with pytest.raises(InvalidParameterError, match="prefill once"):
        decoder.prefill([[1]])
    decoder.fork(0, 2, 5, 3)
    decoder.run()
    with pytest.raises(InvalidParameterError, match="fork before run"):
        decoder.fork(0, 1, 5, 3)
