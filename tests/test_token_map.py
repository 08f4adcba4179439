"""Token maps and the restricted draft (FR-Spec): the table counts and ranks ids, loading checks the file and the
subset, and a ModelDrafter restricted to a subset stays lossless.

- with every id in the subset it proposes exactly what the unrestricted drafter proposes (same tokens, same q,
  same hidden states, bit for bit), greedy and sampled;
- with fewer ids its greedy tokens are the argmax over the subset of the full draft logits, its q the shared
  warp of those logits with everything else at probability 0;
- speculative sampling with it equals Baseline under greedy decoding (tiny Llama) and reproduces the target's
  exact law under sampling (a toy trigram draft split into body + output layer, G-test); reporting the
  unrestricted q for subset-drawn tokens fails the same check.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn
from toy import ToyLM, ToyOutput
from transformers import LlamaForCausalLM

from src.decoding import Baseline, SamplingConfig, SpeculativeSampling
from src.decoding.base import model_logits
from src.decoding.drafters import ModelDrafter
from src.decoding.sampling import logits_to_probs, make_generator
from src.decoding.token_map import (
    TokenMap,
    build_from_files,
    count_token_ids,
    main,
    read_token_map,
    texts_from_jsonl,
    token_lists_from_results,
)
from src.errors import InvalidParameterError, MalformedInputError, MissingInputError
from src.results.keys import recorded_params

GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=0.8, top_p=0.9)
ALPHA = 1e-3  # exactness: the G-test must not reject at this level
CPU = torch.device("cpu")
LLAMA_PROMPTS = [[1, 5, 9, 33], [1, 100, 7], [1] + list(range(10, 60))]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP wake-ups would dominate on 2 cores


def write_map(folder, sequences, vocab_size, name="map.json") -> str:
    """A token map of ``sequences`` (lists of ids) saved under ``folder``; returns its path."""
    path = folder / name
    TokenMap.from_counts(count_token_ids(sequences, vocab_size), "test", []).save(path)
    return str(path)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- the table


def test_counts_rank_and_round_trip(tmp_path):
    counts = count_token_ids([[3, 3, 1], [3, 1, 0], []], 6)
    assert counts.tolist() == [1, 2, 0, 3, 0, 0]
    table = TokenMap.from_counts(counts, "tok", [{"kind": "results", "path": "r.jsonl", "tokens": 6}])
    assert table.top_ids == [3, 1, 0] and table.top_counts == [3, 2, 1] and table.counts_total == 6
    assert table.coverage(2) == pytest.approx(5 / 6)
    tied = TokenMap.from_counts(torch.tensor([0, 2, 2, 1, 2]), "tok", [])
    assert tied.top_ids == [1, 2, 4, 3]  # ties: smaller id first
    table.save(tmp_path / "sub" / "map.json")
    loaded = read_token_map(tmp_path / "sub" / "map.json")
    assert (loaded.top_ids, loaded.top_counts, loaded.vocab_size, loaded.tokenizer) == ([3, 1, 0], [3, 2, 1], 6, "tok")
    assert loaded.source == table.source
    assert set(json.loads((tmp_path / "sub" / "map.json").read_text())) >= {
        "tokenizer", "vocab_size", "source", "counts_total", "top_ids"
    }


def test_select_includes_must_ids_ascends_and_fills_with_unseen_ids(tmp_path):
    path = write_map(tmp_path, [[7, 7, 7, 3, 3, 5]], 10)  # ranked 7, 3, 5; unseen 0, 1, 2, 4, 6, 8, 9
    assert read_token_map(path).select(2, 10).tolist() == [3, 7]
    assert read_token_map(path).select(2, 10, include=[9]).tolist() == [7, 9]  # exactly N: 9, then the top id
    assert read_token_map(path).select(5, 10).tolist() == [0, 1, 3, 5, 7]  # seen ids first, then unseen from 0 up
    assert read_token_map(path).select(10, 12).tolist() == list(range(10))
    assert read_token_map(path).select(3, 10, include=[7, 2]).tolist() == [2, 3, 7]


def test_jsonl_readers(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"question_id": 1, "turns": ["a b", "c"], "reference": ["d"]}\n\n'
        '{"question": "q", "answer": "x #### 4"}\n'
        '{"prompt": "p", "answer": 3, "id": "z"}\n'
    )
    assert texts_from_jsonl(prompts) == ["a b", "c", "d", "q", "x #### 4", "p"]
    results = tmp_path / "results.jsonl"
    results.write_text('{"tokens": [1, 2]}\n{"note": "no tokens"}\n{"tokens": []}\n')
    assert token_lists_from_results(results) == [[1, 2], []]


class CharTokenizer:
    """Each character is one id (``ord % 50``): enough to check what the builder counts."""

    def __len__(self) -> int:
        return 50

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[ord(c) % 50 for c in text] for text in texts]}


def test_build_from_prompt_and_results_files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "aab"}\n{"turns": ["b"]}\n')
    results = tmp_path / "results.jsonl"
    results.write_text('{"tokens": [1, 1, 1]}\n')
    table = build_from_files(CharTokenizer(), "chars", [prompts], [results])
    a, b = ord("a") % 50, ord("b") % 50
    assert table.top_ids[:3] == [1, a, b] and table.top_counts[:3] == [3, 2, 2] and table.counts_total == 7
    assert [s["tokens"] for s in table.source] == [4, 3] and table.vocab_size == 50


def test_command_line_builds_a_map(tmp_path, capsys):
    """``main`` with a local tokenizer folder (a word-level tokenizer saved in the test: no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "cat", "sat", "on", "mat"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the mat"}\n')
    out = tmp_path / "out" / "map.json"
    assert main(["--tokenizer", str(tmp_path / "tok"), "--from-prompts", str(prompts), "--out", str(out)]) == 0
    table = read_token_map(out)
    assert table.top_ids == [1, 2, 3, 4, 5] and table.vocab_size == 6
    assert main(["--tokenizer", str(tmp_path / "tok"), "--from-prompts", str(tmp_path / "none.jsonl"),
                 "--out", str(out)]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_load_errors_are_one_line(tmp_path):
    path = write_map(tmp_path, [[1, 2, 3]], 8)
    with pytest.raises(MissingInputError) as error:
        read_token_map(tmp_path / "missing.json").select(4, 8)
    assert "missing.json does not exist" in one_line(error) and "python -m src.decoding.token_map" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        read_token_map(path).select(9, 8)
    assert "top_tokens=9 exceeds the 8 ids" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        read_token_map(path).select(4, 6)  # the map was made for 8 ids, the models share 6
    assert "covers 8 ids" in one_line(error)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(InvalidParameterError) as error:
            read_token_map(path).select(bad, 8)
        assert f"top_tokens={bad!r}" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        read_token_map(path).select(2, 8, include=[8])
    assert "[8]" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        read_token_map(path).select(1, 8, include=[1, 2])
    assert "use top_tokens >= 2" in one_line(error)
    files = {
        "id.json": ({"tokenizer": "t", "vocab_size": 8, "counts_total": 1, "top_ids": [3, 8]}, "id 8 is outside"),
        "repeat.json": ({"tokenizer": "t", "vocab_size": 8, "counts_total": 1, "top_ids": [3, 3]}, "repeats"),
        "keys.json": ({"tokenizer": "t", "top_ids": []}, "lacks ['vocab_size', 'counts_total']"),
    }
    for name, (table, message) in files.items():
        (tmp_path / name).write_text(json.dumps(table))
        with pytest.raises(MalformedInputError) as error:
            read_token_map(tmp_path / name).select(1, 8)
        assert message in one_line(error)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(MalformedInputError) as error:
        read_token_map(tmp_path / "text.json").select(1, 8)
    assert "is not JSON" in one_line(error)
    with pytest.raises(MalformedInputError) as error:
        count_token_ids([[1, 9]], 8)
    assert "token id 9 is outside [0, 8)" in one_line(error)


# ---------------------------------------------------------------- the drafter's arguments


def test_drafter_arguments_are_checked(tmp_path):
    path = write_map(tmp_path, [[1, 2, 3]], 128)
    cases = [
        ({"top_tokens": 8}, InvalidParameterError, "top_tokens is set without token_map"),
        ({"token_map": path}, InvalidParameterError, "token_map is set without top_tokens"),
        ({"top_tokens": 0, "token_map": path}, InvalidParameterError, "top_tokens=0 is invalid"),
        ({"top_tokens": 129, "token_map": path}, InvalidParameterError, "use top_tokens <= 128"),
        ({"top_tokens": 8, "token_map": str(tmp_path / "x.json")}, MissingInputError, "x.json does not exist"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind) as error:
            ModelDrafter(**kwargs)
        assert message in one_line(error)


def test_params_and_input_files(tmp_path):
    path = write_map(tmp_path, [[1, 2, 3]], 128)
    assert recorded_params("speculative", {"drafter": "draft_model", **ModelDrafter().params()}) == {} and ModelDrafter().input_files() == []
    drafter = ModelDrafter(top_tokens=16, token_map=path)
    assert drafter.params() == {"top_tokens": 16, "token_map": "map.json"} and drafter.input_files() == [path]


class ScaledLlama(torch.nn.Module):
    """A draft whose logits are not lm_head(final hidden state): its real logits are halved (like a soft cap)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 0.5
        return out

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_drafts_that_cannot_be_cut_are_refused(tmp_path, llama_pair):
    path = write_map(tmp_path, [[1, 2, 3]], 128)
    drafter = ModelDrafter(top_tokens=16, token_map=path)
    with pytest.raises(InvalidParameterError) as error:
        drafter.begin(ToyLM(vocab_size=128), 128, CPU)
    assert "ToyLM has none" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        drafter.begin(ScaledLlama(llama_pair[1]), 128, CPU)
    assert "logits are not its output layer applied" in one_line(error)


def tied_tiny_llama() -> LlamaForCausalLM:
    """A tiny Llama whose lm_head is its input embedding matrix (as SmolLM2's)."""
    config = build_tiny_llama(seed=0).config
    config.tie_word_embeddings = True
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return LlamaForCausalLM(config).eval()


def test_the_model_is_untouched_and_the_cut_is_reused(tmp_path):
    draft = tied_tiny_llama()
    assert draft.lm_head.weight is draft.model.embed_tokens.weight
    before = {name: tensor.clone() for name, tensor in draft.state_dict().items()}
    drafter = ModelDrafter(top_tokens=16, token_map=write_map(tmp_path, [[1, 2, 3]], 128))
    with torch.inference_mode():
        drafter.begin(draft, 128, CPU)
        head = drafter.head
        drafter.propose([1, 5, 9], 3, SAMPLED, make_generator(0))
        drafter.begin(draft, 128, CPU)
    assert drafter.head is head  # one cut per draft model, not one per generation
    assert 2 in head.ids.tolist()  # the draft's EOS (tiny Llama: 2) is always kept
    assert all(torch.equal(before[name], tensor) for name, tensor in draft.state_dict().items())
    assert draft.lm_head.weight is draft.model.embed_tokens.weight and draft.lm_head.weight.shape == (128, 64)
    with torch.no_grad():
        draft.lm_head.weight[5] += 1.0  # edited weights: the next generation cuts again
    drafter.begin(draft, 128, CPU)
    assert drafter.head is not head


# ---------------------------------------------------------------- proposals


def propose_cycles(drafter, draft, sampling, seed, stop_below=0.0):
    """Four proposals along one sequence (each keeps 2 drafts + one new token), as a verifier drives them."""
    drafter.begin(draft, 128, CPU)
    generator = make_generator(seed)
    sequence, proposals = [1, 5, 9, 33], []
    for step in range(4):
        proposal = drafter.propose(sequence, 4, sampling, generator, stop_below)
        proposals.append(proposal)
        kept = proposal.tokens[:2].tolist()
        drafter.commit(len(sequence) + len(kept))
        sequence += [*kept, 17 + step]
    return proposals


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("hidden_states", [False, True])
def test_every_id_in_the_subset_changes_nothing(tmp_path, llama_pair, sampling, hidden_states):
    _, draft = llama_pair
    path = write_map(tmp_path, [list(range(128)), [5, 5, 9]], 128)
    with torch.inference_mode():
        plain = propose_cycles(ModelDrafter(hidden_states), draft, sampling, seed=3)
        cut = propose_cycles(ModelDrafter(hidden_states, top_tokens=128, token_map=path), draft, sampling, seed=3)
    for a, b in zip(plain, cut):
        assert torch.equal(a.tokens, b.tokens) and a.forwards == b.forwards
        assert (a.q is None and b.q is None) or torch.equal(a.q, b.q)
        assert (a.hidden is None and b.hidden is None) or torch.equal(a.hidden, b.hidden)


def test_subset_proposals_follow_the_masked_full_logits(tmp_path, llama_pair):
    """Greedy: each token is the argmax of the full draft logits over the subset; sampled: q is the warp of
    those logits with -inf outside the subset (0 there, rows summing to 1)."""
    _, draft = llama_pair
    path = write_map(tmp_path, [[4, 4, 60, 61, 62, 99, 7, 8, 9, 10, 11, 30, 31]], 128)
    drafter = ModelDrafter(top_tokens=12, token_map=path)
    sequence = [1, 5, 9, 33]
    with torch.inference_mode():
        drafter.begin(draft, 128, CPU)
        ids = drafter.head.ids
        outside = torch.ones(128, dtype=torch.bool)
        outside[ids] = False

        def masked_logits(context):  # the draft's full logits after ``context``, -inf outside the subset
            logits = model_logits(draft, torch.tensor([context]), None)[0, -1]
            return logits.masked_fill(outside, float("-inf"))

        greedy = drafter.propose(sequence, 6, GREEDY, None).tokens.tolist()
        for i, token in enumerate(greedy):
            assert token in ids.tolist()
            assert token == int(masked_logits(sequence + greedy[:i]).argmax())
        drafter.begin(draft, 128, CPU)
        sampled = drafter.propose(sequence, 4, SAMPLED, make_generator(1))
        for i, token in enumerate(sampled.tokens.tolist()):
            expected = logits_to_probs(masked_logits(sequence + sampled.tokens[:i].tolist()), SAMPLED)
            assert sampled.q[i, token] > 0 and float(sampled.q[i, outside].sum()) == 0.0
            torch.testing.assert_close(sampled.q[i], expected, atol=1e-5, rtol=1e-4)


def test_confidence_threshold_reads_the_subset(tmp_path, llama_pair):
    """A restricted greedy chain stops once the subset softmax of its token is below the threshold."""
    _, draft = llama_pair
    path = write_map(tmp_path, [[5, 6, 7]], 128)
    with torch.inference_mode():
        chains = propose_cycles(ModelDrafter(top_tokens=3, token_map=path), draft, GREEDY, 0, stop_below=0.9)
        full = propose_cycles(ModelDrafter(top_tokens=3, token_map=path), draft, GREEDY, 0)
    assert all(p.tokens.numel() == 1 for p in chains)  # 3 near-uniform random logits: confidence ~ 1/3
    assert all(p.tokens.numel() == 4 for p in full)


# ---------------------------------------------------------------- lossless: speculative sampling


@pytest.mark.parametrize("k", [1, 3])
def test_restricted_greedy_equals_baseline_on_tiny_llama(tmp_path, llama_pair, k):
    target, draft = llama_pair
    path = write_map(tmp_path, [list(range(0, 128, 3)), [5, 9, 33, 5]], 128)
    method = SpeculativeSampling(k, drafter=ModelDrafter(top_tokens=24, token_map=path))
    for prompt in LLAMA_PROMPTS:
        input_ids = torch.tensor([prompt])
        reference = Baseline().generate(target, None, input_ids, 20, GREEDY, {2})
        generation = method.generate(target, draft, input_ids, 20, GREEDY, {2})
        assert generation.tokens == reference.tokens, f"prompt {prompt}"
        assert generation.stats.drafted_tokens > 0


def test_restricted_sampling_is_reproducible_with_a_wider_target(tmp_path):
    """A target that scores more ids than the draft (128 vs 96): the subset lives on the shared ids."""
    target, draft = build_tiny_llama(seed=0, vocab_size=128), build_tiny_llama(seed=0, vocab_size=96)
    path = write_map(tmp_path, [list(range(96))], 96)
    method = SpeculativeSampling(2, drafter=ModelDrafter(top_tokens=40, token_map=path))
    runs = [method.generate(target, draft, torch.tensor([[1, 5, 9]]), 12, SAMPLED, set(), make_generator(5))
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and max(runs[0].tokens) < 128


class ToyBody:
    """The body of a :class:`ToyHeadLM`: the trigram row, read as a hidden state of width vocab."""

    def __init__(self, lm: ToyLM) -> None:
        self.lm = lm

    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    def forward(self, input_ids, cache=None, use_cache=True, **kwargs):
        out = ToyLM.forward(self.lm, input_ids, cache=cache, use_cache=use_cache)
        return SimpleNamespace(last_hidden_state=out.logits)


class ToyHeadLM(ToyLM):
    """A toy draft split into a body and an output layer (a Linear vocab -> vocab with a bias), so that a drafter
    can cut its rows; its own law is whatever the head makes of the table (a draft's law never matters for
    exactness, only for acceptance)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        width = self.config.vocab_size
        generator = torch.Generator().manual_seed(7)
        self.head = nn.Linear(width, width)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(width) + 0.1 * torch.randn(width, width, generator=generator))
            self.head.bias.copy_(0.3 * torch.randn(width, generator=generator))

    def forward(self, input_ids, cache=None, **kwargs) -> ToyOutput:
        out = super().forward(input_ids, cache=cache, **kwargs)
        return ToyOutput(self.head(out.logits), out.cache)

    def get_decoder(self) -> ToyBody:
        return ToyBody(self)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


def window_counts(method, target, draft, sampling, n_samples, prompt=(1, 2), seed=0):
    """Empirical law of generated tokens [k - 1, k + 2) of ``k + 2``-token generations, and the exact law."""
    max_new_tokens, start = method.k + 2, method.k - 1
    input_ids = torch.tensor([list(prompt)])
    generator = make_generator(seed)
    counts: Counter = Counter()
    for _ in range(n_samples):
        tokens = method.generate(target, draft, input_ids, max_new_tokens, sampling, set(), generator).tokens
        counts[tuple(tokens[start : start + 3])] += 1
    return counts, target.exact_window(list(prompt), start, 3, sampling)


@pytest.fixture
def toy_head_pair(tmp_path):
    """(target, draft, map path): the 20-token toy target, a perturbed toy draft with an output layer, and a map
    whose top 8 ids leave out some of the target's likely tokens."""
    target = ToyLM(vocab_size=20, seed=0)
    draft = ToyHeadLM(vocab_size=20, seed=0).perturbed(noise=1.0, seed=1)
    return target, draft, write_map(tmp_path, [[0, 1, 2, 3, 4, 5, 6, 7] * 3, list(range(20))], 20)


@pytest.mark.parametrize("k", [2, 4])
def test_restricted_sampling_is_exact(toy_head_pair, goodness_of_fit, k):
    target, draft, path = toy_head_pair
    method = SpeculativeSampling(k, drafter=ModelDrafter(top_tokens=8, token_map=path))
    counts, exact = window_counts(method, target, draft, SamplingConfig(temperature=1.0), n_samples=8_000)
    assert goodness_of_fit(counts, exact) > ALPHA
    assert method.drafter.head.ids.tolist() == list(range(8))


def test_reporting_the_unrestricted_q_fails_the_check(toy_head_pair, goodness_of_fit):
    """Tokens drawn from the subset but verified against the full-vocabulary q: the residual then misses the
    mass q put outside the subset, and the output law is off."""
    target, draft, path = toy_head_pair

    class WrongQ(ModelDrafter):
        def propose(self, sequence, k, sampling, generator, stop_below=0.0):
            proposal = super().propose(sequence, k, sampling, generator, stop_below)
            tokens = proposal.tokens.tolist()
            if tokens:  # the full draft's q after each drafted prefix: body row, then every output row
                rows = [draft.exact_next_logits(list(sequence) + tokens[:i]) for i in range(len(tokens))]
                proposal.q = logits_to_probs(draft.head(torch.stack(rows)), sampling)
            return proposal

    method = SpeculativeSampling(2, drafter=WrongQ(top_tokens=8, token_map=path))
    counts, exact = window_counts(method, target, draft, SamplingConfig(temperature=1.0), n_samples=3_000)
    assert goodness_of_fit(counts, exact) < 1e-6

