"""The EAGLE drafter: a head on the target's features proposes the chain that speculative sampling verifies.

Greedy output equals the baseline's (with drafts accepted, so commits of accepted drafts and their features are
exercised); under sampling the output law is exactly the target's (G-test against the law computed by enumerating
every continuation of a small, sharp tiny Llama), and a rule that trusts the head fails the same test; a head
trained a little on the target's own features is accepted more often than an untrained one.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from conftest import build_tiny_llama, method_key, recorded

from src.decoding import Baseline, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.base import model_logits_and_hidden
from src.decoding.eagle import EagleDrafter
from src.decoding.kv import new_cache
from src.decoding.sampling import logits_to_probs, make_generator, sample
from src.errors import IncompatibleModelsError, InvalidParameterError, MissingInputError
from src.models.eagle import EagleHead

ALPHA = 1e-3
GREEDY = SamplingConfig()
PROMPTS = [[5, 17, 33, 9], [1, 2, 3, 4, 5, 6, 7, 8], [100, 3, 100, 3, 100], [42]]


def generate(method, target, prompt, max_new_tokens, sampling=GREEDY, generator=None, eos=()):
    return method.generate(target, None, torch.tensor([list(prompt)]), max_new_tokens, sampling, set(eos), generator)


def eagle(target, tmp_path, top_token_ids=None, seed=0, name="head", k=3, cls=SpeculativeSampling, train_on=None,
          tree=None):
    """Speculative sampling with an EAGLE head saved to tmp_path (random, or trained a little on ``train_on``);
    ``tree=(budget, max_depth)``: SpecExec growing its tree with the head (EAGLE-2) instead."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = EagleHead(target.config, top_token_ids=top_token_ids)
    if train_on is not None:
        train_head(head, target, train_on)
    path = tmp_path / name
    head.save(path, {"target": None})
    if tree is not None:
        budget, depth = tree
        return (cls if cls is not SpeculativeSampling else SpecExec)(budget=budget, max_depth=depth,
                                                                      drafter=EagleDrafter(str(path)))
    return cls(k, drafter=EagleDrafter(str(path)))


def train_head(head: EagleHead, target, sequences: list[list[int]], steps: int = 150) -> None:
    """Teacher-forced EAGLE training on the target's own features of ``sequences`` (regression + token CE)."""
    batches = []
    with torch.no_grad():
        for sequence in sequences:  # one at a time: lengths may differ
            ids = torch.tensor([sequence])  # (1, T)
            features = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (1, T, H)
            embedded = target.get_input_embeddings()(ids[:, 1:])  # x_{t+1}
            p = torch.softmax(head.logits(features[:, 1:], target.lm_head.weight), -1)
            batches.append((features, embedded, p))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = 0.0
        for features, embedded, p in batches:
            predicted = head(features[:, :-1], embedded)  # f̂_{t+1}
            log_q = torch.log_softmax(head.logits(predicted, target.lm_head.weight), -1)
            loss = loss + torch.nn.functional.smooth_l1_loss(predicted, features[:, 1:]) - 0.1 * (p * log_q).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def greedy_texts(target):
    """The target's own greedy continuations of PROMPTS: what a head trained on its outputs should draft."""
    return [p + generate(Baseline(), target, p, 40).tokens for p in PROMPTS]


# ---------------------------------------------------------------- greedy: the baseline's tokens


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("k", "subset"), [(1, False), (4, True)])
def test_greedy_equals_baseline(target, tmp_path, greedy_texts, k, subset):
    """Token for token the baseline's output, with a trained head (drafts accepted) and a restricted
    vocabulary or not; one head forward per drafted token and no draft model."""
    sequences = [text[:40] for text in greedy_texts]
    ids = torch.arange(0, 128, 2) if subset else None  # half the ids: q is 0 on the others
    method = eagle(target, tmp_path, top_token_ids=ids, k=k, train_on=sequences)
    accepted = 0
    for prompt in PROMPTS:
        expected = generate(Baseline(), target, prompt, 30).tokens
        generation = generate(method, target, prompt, 30)
        assert generation.tokens == expected, f"prompt {prompt}"
        stats = generation.stats
        assert stats.draft_calls == stats.drafted_tokens  # one head forward per drafted token
        assert stats.accepted_per_step[0] == 0  # the first cycle is the target's prefill: nothing drafted
        assert len(generation.tokens) == stats.accepted_tokens + stats.target_calls
        accepted += stats.accepted_tokens
    assert accepted > 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("shape", "subset"), [((6, 3), False), ((16, 6), True)])
def test_tree_greedy_equals_baseline(target, tmp_path, greedy_texts, shape, subset):
    """SpecExec growing its tree with the head: the baseline's tokens, drafts accepted, trees really branching."""
    ids = torch.arange(0, 128, 2) if subset else None
    method = eagle(target, tmp_path, top_token_ids=ids, tree=shape, train_on=[t[:40] for t in greedy_texts])
    accepted = 0
    for prompt in PROMPTS:
        generation = generate(method, target, prompt, 30)
        assert generation.tokens == generate(Baseline(), target, prompt, 30).tokens, f"prompt {prompt}"
        assert generation.stats.extra["tree_size"][0] == 0  # the first iteration is the target's prefill
        accepted += generation.stats.accepted_tokens
    assert accepted > 0 and max(generation.stats.extra["leaves"]) > 1
    assert method_key(method) == "specexec+eagle" and recorded(method)["drafter"] == "eagle"


@pytest.mark.usefixtures("one_thread")
def test_trained_head_is_accepted_more_than_a_random_one(target, tmp_path, greedy_texts):
    """The head learns from the target's features: tokens per target call rise after a little training."""
    def tokens_per_call(method) -> float:
        runs = [generate(method, target, p, 30) for p in PROMPTS]
        return sum(len(r.tokens) for r in runs) / sum(r.stats.target_calls for r in runs)

    untrained = tokens_per_call(eagle(target, tmp_path, name="random"))
    trained = tokens_per_call(eagle(target, tmp_path, name="trained", train_on=[t[:40] for t in greedy_texts]))
    assert trained > untrained + 0.3, (untrained, trained)


# ---------------------------------------------------------------- sampling: exactly the target law

SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95)
SMALL_PROMPT = [3, 7, 1, 12]
WINDOW = 3  # the first three generated tokens: the prefill's token, then drafted and verified ones


@pytest.fixture(scope="module")
def sharp_target():
    """A 16-token tiny Llama with sharpened logits: few tokens per step carry the mass, so the exact law of a
    3-token window is a sum over 16^3 paths and the head's q differs from p."""
    model = build_tiny_llama(seed=4, vocab_size=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def exact_window_law(model, prompt: list[int], length: int, sampling: SamplingConfig) -> dict[tuple, float]:
    """P(x_0..x_{length-1} | prompt) for every continuation, by batched forwards over all prefixes."""
    law = {(): 1.0}
    for _ in range(length):
        prefixes = list(law)
        batch = torch.tensor([prompt + list(prefix) for prefix in prefixes])
        with torch.no_grad():
            probs = logits_to_probs(model(input_ids=batch).logits[:, -1], sampling)  # (n, V)
        law = {prefix + (token,): law[prefix] * float(probs[i, token])
               for i, prefix in enumerate(prefixes) for token in range(probs.shape[1]) if probs[i, token] > 0}
    return law


class TrustTheHead(SpeculativeSampling):
    """WRONG on purpose: every drafted token is kept, the bonus drawn from p."""

    def accept(self, drafts, p, q, sampling, generator):
        if sampling.greedy:
            return super().accept(drafts, p, q, sampling, generator)
        return drafts.numel(), int(sample(p[drafts.numel()], generator))


def window_counts(method, model, n_samples: int) -> tuple[Counter, list]:
    generator = make_generator(0)
    counts: Counter = Counter()
    runs = []
    for _ in range(n_samples):
        generation = generate(method, model, SMALL_PROMPT, WINDOW, SAMPLING, generator)
        counts[tuple(generation.tokens)] += 1
        runs.append(generation)
    return counts, runs


def sampling_case(sharp_target, tmp_path, n_samples, cls=SpeculativeSampling, tree=None):
    method = eagle(sharp_target, tmp_path, k=2, cls=cls, seed=1, tree=tree)
    counts, runs = window_counts(method, sharp_target, n_samples)
    return counts, runs, exact_window_law(sharp_target, SMALL_PROMPT, WINDOW, SAMPLING)


@pytest.mark.usefixtures("one_thread")
def test_sampling_is_exact(sharp_target, tmp_path, goodness_of_fit):
    """4,000 samples in the default suite (the slow test below takes 20,000): drafts are sometimes accepted,
    sometimes rejected, and the window's law is the target's."""
    counts, runs, exact = sampling_case(sharp_target, tmp_path, 4_000)
    drafted = sum(run.stats.drafted_tokens for run in runs)
    accepted = sum(run.stats.accepted_tokens for run in runs)
    assert 0.05 * drafted < accepted < 0.95 * drafted
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_tree_sampling_is_exact(sharp_target, tmp_path, goodness_of_fit):
    """The head's tree (budget 4, depth 2) under sampling: off-first-branch acceptances happen, law exact."""
    counts, runs, exact = sampling_case(sharp_target, tmp_path, 4_000, tree=(4, 2))
    assert sum(run.stats.accepted_tokens for run in runs) > 0.05 * len(runs)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tree", [None, (4, 2)])
def test_sampling_is_exact_20k(sharp_target, tmp_path, goodness_of_fit, tree):
    counts, _, exact = sampling_case(sharp_target, tmp_path, 20_000, tree=tree)
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_trusting_the_head_fails_the_check(sharp_target, tmp_path, goodness_of_fit):
    """Teeth: the same check with fewer samples rejects a rule that keeps every draft."""
    counts, _, exact = sampling_case(sharp_target, tmp_path, 1_500, cls=TrustTheHead)
    assert goodness_of_fit(counts, exact) < 1e-6


def test_exact_law_sums_to_one(sharp_target):
    law = exact_window_law(sharp_target, SMALL_PROMPT, 2, SAMPLING)
    assert abs(sum(law.values()) - 1.0) < 1e-5 and len(law) > 2


# ---------------------------------------------------------------- state, parameters, refusals


@pytest.mark.usefixtures("one_thread")
def test_drafter_state_tracks_the_target(target, tmp_path):
    """After every cycle the drafter holds exactly the target's features of all but the newest token, equal to
    a fresh forward over the committed sequence, and its head cache only exact pairs."""
    method = eagle(target, tmp_path, k=3, train_on=[PROMPTS[1] * 5])
    drafter = method.drafter
    original_commit = drafter.commit
    seen = []

    def checking_commit(length, features=None):
        original_commit(length, features)
        seen.append((length, drafter.known, torch.cat(drafter.features)))

    drafter.commit = checking_commit
    generation = generate(method, target, PROMPTS[1], 20)
    sequence = PROMPTS[1] + generation.tokens
    for length, known, features in seen:
        assert known == length
        _, hidden = model_logits_and_hidden(target, torch.tensor([sequence[:length]]), new_cache())
        torch.testing.assert_close(features, hidden[0], rtol=1e-4, atol=1e-4)


def test_params_method_key_and_input_files(tmp_path, target):
    method = eagle(target, tmp_path)
    assert method_key(method) == "speculative+eagle" and not method.needs_draft
    assert recorded(method)["drafter"] == "eagle" and recorded(method)["head_path"].endswith("head")
    assert [f.rsplit(".", 1)[-1] for f in method.input_files()] == ["safetensors", "json"]


def test_refusals(tmp_path, target):
    with pytest.raises(InvalidParameterError, match="head_path"):
        EagleDrafter("")
    with pytest.raises(InvalidParameterError, match="confidence_threshold"):
        SpeculativeSampling(4, confidence_threshold=0.3, drafter=EagleDrafter("x"))
    without_path = SpeculativeSampling(2, drafter=EagleDrafter())
    with pytest.raises(InvalidParameterError, match="no head_path"):
        generate(without_path, target, PROMPTS[0], 4)


def test_missing_head_is_refused_before_any_prompt(tmp_path):
    method = SpeculativeSampling(2, drafter=EagleDrafter(str(tmp_path / "nope")))
    with pytest.raises(MissingInputError, match=r"nope\.safetensors does not exist.*configs/eagle1\.yaml"):
        method.prepare({"name": "t"}, None)


def test_head_for_another_target_is_refused(tmp_path, target):
    head = EagleHead(target.config)
    head.save(tmp_path / "head", {"target": {"name": "other-model", "dtype": "float32", "revision": None}})
    method = SpeculativeSampling(2, drafter=EagleDrafter(str(tmp_path / "head")))
    method.prepare({"name": "embedded:smollm2-135m-instruct", "dtype": "float32"}, None)
    with pytest.raises(IncompatibleModelsError, match="other-model"):
        generate(method, target, PROMPTS[0], 4)


def test_window_law_enumeration_matches_sampling_itself(sharp_target):
    """The reference law is right: plain sampling from the target (Baseline) passes the same check."""
    from conftest import fit_pvalue

    generator = make_generator(1)
    counts = Counter(tuple(generate(Baseline(), sharp_target, SMALL_PROMPT, WINDOW, SAMPLING, generator).tokens)
                     for _ in range(2_000))
    assert fit_pvalue(counts, exact_window_law(sharp_target, SMALL_PROMPT, WINDOW, SAMPLING)) > ALPHA
    assert len(list(itertools.islice(counts, 3))) == 3


# ---------------------------------------------------------------- the embedded SmolLM2


@pytest.mark.slow
def test_embedded_greedy_equals_baseline_chain_and_tree(embedded_target):
    """SmolLM2 (fp32), 10 MT-Bench + 10 Spec-Bench prompts, 128 tokens: a head trained briefly on the target's
    own answers to two of them drafts for a chain (k=4) and a tree (budget 16, depth 6); both reproduce the
    baseline's tokens on every prompt, with drafts accepted."""
    import tempfile
    from pathlib import Path

    from test_drafters import embedded_cases, logit_margin

    from src.results.records import first_divergence

    model, tokenizer = embedded_target.model, embedded_target.tokenizer
    eos = {tokenizer.eos_token_id}
    cases = [(label, chat_ids(tokenizer, text)) for label, text in embedded_cases(mt_bench=10, spec_bench=10)]
    expected = {label: Baseline().generate(model, None, ids, 128, GREEDY, eos).tokens for label, ids in cases}
    with tempfile.TemporaryDirectory() as folder:
        head = EagleHead(model.config, top_token_ids=torch.arange(0, 8192))
        train_head(head, model, [cases[i][1][0].tolist() + expected[cases[i][0]] for i in (0, 1)], steps=100)
        head.save(Path(folder) / "head", {"target": None})
        methods = {"chain": SpeculativeSampling(4, drafter=EagleDrafter(str(Path(folder) / "head"))),
                   "tree": SpecExec(budget=16, max_depth=6, drafter=EagleDrafter(str(Path(folder) / "head")))}
        failures, accepted = [], Counter()
        for label, ids in cases:
            for name, method in methods.items():
                generation = method.generate(model, None, ids, 128, GREEDY, eos)
                accepted[name] += generation.stats.accepted_tokens
                index = first_divergence(generation.tokens, expected[label])
                if index is not None:
                    margin = logit_margin(model, ids, expected[label], index)
                    failures.append(f"{name} on {label}: first divergence at {index}, top-2 margin {margin:.2e}")
    assert not failures, "\n".join(failures)
    assert all(accepted[name] > 0 for name in methods), accepted


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    from conftest import chat_input_ids

    return chat_input_ids(tokenizer, text)
