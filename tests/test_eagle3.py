"""EAGLE-3 heads: the three published layouts load (checkpoints built here), draft exactly for chains and trees,
the training-time test matches decoding step for step, and every bad input is refused in one line.

Greedy output equals the baseline's with drafts accepted; under sampling the output law is the target's (G-test
against the enumerated law of a sharp 16-token tiny Llama), and a rule that trusts the head fails the same test.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama
from test_eagle_drafter import (
    ALPHA,
    PROMPTS,
    SAMPLING,
    SMALL_PROMPT,
    WINDOW,
    TrustTheHead,
    exact_window_law,
    generate,
    window_counts,
)

from src.decoding import Baseline, SpecExec, SpeculativeSampling
from src.decoding.base import layer_features, model_logits_and_hidden
from src.decoding.eagle import EagleDrafter
from src.decoding.kv import new_cache
from src.errors import IncompatibleModelsError, InvalidParameterError, MalformedInputError
from src.models.eagle3 import Eagle3Config, Eagle3Head, default_aux_layers, ttt_forward, ttt_mask
from src.models.eagle_formats import load_head, save_speculators

AUX = (2, 3, 3)  # EAGLE-3's default layers (2, L // 2, L - 3) of the 6-layer tiny Llama
SHARP_AUX = (0, 1, 1)  # the sharp 2-layer one's
IDENTITY = {"name": "tiny-llama", "dtype": "float32", "revision": None}


def new_head(target, draft_ids=None, seed=0, aux_layers=AUX) -> Eagle3Head:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = Eagle3Config.for_target(target.config, draft_vocab_size=None if draft_ids is None else len(draft_ids),
                                         aux_layers=aux_layers)
        head = Eagle3Head(config, draft_ids=draft_ids)
        head.init_from_target(target)
    return head


def train_head(head: Eagle3Head, target, sequences: list[list[int]], steps: int = 120, unroll: int = 2) -> Eagle3Head:
    """Token loss over the training-time test on the target's own states of ``sequences``."""
    data = []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence])
            out = target(input_ids=ids, output_hidden_states=True)
            aux = layer_features(out.hidden_states, head.aux_layers)  # (1, T, 3H)
            rows = target.lm_head.weight[head.vocab_ids()]
            p = torch.softmax(out.hidden_states[-1][:, 1:] @ rows.T, -1)  # target over the draft ids, x_{p+2}
            data.append((aux[:, :-1], target.get_input_embeddings()(ids[:, 1:]), p))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = 0.0
        for aux, embedded, p in data:
            for j, hidden in enumerate(ttt_forward(head, aux, embedded, unroll), start=1):
                log_q = torch.log_softmax(head.logits(hidden), -1)[:, j - 1 :]
                loss = loss - (p[:, j - 1 :] * log_q).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(seed=0, num_layers=6)


@pytest.fixture(scope="module")
def trained(target):
    """A head over half the vocabulary, trained a little on the target's own greedy continuations."""
    texts = [p + generate(Baseline(), target, p, 40).tokens for p in PROMPTS]
    return train_head(new_head(target, torch.arange(0, 128, 2)), target, [t[:40] for t in texts])


def export(head, target, folder):
    save_speculators(head, folder, IDENTITY, target.config, {"note": "test"})
    return str(folder)


# ---------------------------------------------------------------- the training-time test is decoding


def test_ttt_mask_pattern():
    """Step 3, 4 rows: row p sees step-1 keys of rows <= p - 2, step-2 key of row p - 1, its own step-3 key."""
    expected = torch.tensor([
        # step 1    step 2    step 3
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(ttt_mask(4, 3), expected)
    assert torch.equal(ttt_mask(3, 1), torch.ones(3, 3, dtype=torch.bool).tril())


def test_ttt_equals_step_by_step_drafting(target):
    """Each step j at row p of the training-time test is what the drafter computes when it drafts step j of the
    chain after the exact pairs 0..p - j + 1: one head cache, exact pairs, then its own outputs."""
    head = new_head(target, seed=3).eval()
    ids = torch.tensor([[5, 17, 33, 9, 60, 61, 2, 8, 90, 4]])
    with torch.no_grad():
        aux = layer_features(target(input_ids=ids, output_hidden_states=True).hidden_states, AUX)[:, :-1]
        embedded = target.get_input_embeddings()(ids[:, 1:])
        outputs = ttt_forward(head, aux, embedded, 3)
        for start in range(0, 6):
            cache = new_cache()
            hidden = head(aux[:, : start + 1], embedded[:, : start + 1], cache=cache)[:, -1:]  # exact pairs 0..s
            torch.testing.assert_close(hidden[0, 0], outputs[0][0, start], rtol=1e-4, atol=1e-5)
            for j in (2, 3):
                row = start + j - 1
                position = torch.tensor([[row]])
                hidden = head(hidden, embedded[:, row : row + 1], position_ids=position, cache=cache)
                torch.testing.assert_close(hidden[0, 0], outputs[j - 1][0, row], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- decoding: the baseline's tokens, the target's law


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shape", ["chain1", "chain3", "tree"])
def test_greedy_equals_baseline(target, trained, tmp_path, shape):
    """Chains (k=1, 3) and a best-first tree (EAGLE-2 style growth) with the exported head: the baseline's tokens,
    drafts accepted, one target forward per cycle and no second pass for the aux states."""
    path = export(trained, target, tmp_path / "head")
    method = SpecExec(budget=8, max_depth=4, drafter=EagleDrafter(path)) if shape == "tree" else \
        SpeculativeSampling(int(shape[-1]), drafter=EagleDrafter(path))
    calls, accepted = [], 0
    original = target.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("output_hidden_states"))
        return original(*args, **kwargs)

    for prompt in PROMPTS:
        expected = generate(Baseline(), target, prompt, 30).tokens
        calls.clear()
        target.forward = counting
        try:
            generation = generate(method, target, prompt, 30)
        finally:
            del target.forward
        assert generation.tokens == expected, f"prompt {prompt}"
        assert len(calls) == generation.stats.target_calls and all(calls)
        accepted += generation.stats.accepted_tokens
    assert accepted > 0
    assert method.drafter.feature_layers == AUX


@pytest.fixture(scope="module")
def sharp_target():
    model = build_tiny_llama(seed=4, vocab_size=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def sampling_case(sharp_target, tmp_path, n_samples, cls=SpeculativeSampling, tree=False):
    head = new_head(sharp_target, torch.tensor([0, 1, 2, 3, 5, 8, 9, 12, 13, 15]), seed=1, aux_layers=SHARP_AUX).eval()
    path = export(head, sharp_target, tmp_path / "sharp")
    method = SpecExec(budget=4, max_depth=2, drafter=EagleDrafter(path)) if tree else cls(2, drafter=EagleDrafter(path))
    counts, runs = window_counts(method, sharp_target, n_samples)
    return counts, runs, exact_window_law(sharp_target, SMALL_PROMPT, WINDOW, SAMPLING)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tree", [False, True])
def test_sampling_is_exact(sharp_target, tmp_path, goodness_of_fit, tree):
    """3,000 windows under temperature 0.8 / top-p 0.95, chain and tree, drafts over a 10-id draft vocabulary:
    some accepted, some rejected, the window's law is the target's."""
    counts, runs, exact = sampling_case(sharp_target, tmp_path, 3_000, tree=tree)
    drafted = sum(run.stats.drafted_tokens for run in runs)
    accepted = sum(run.stats.accepted_tokens for run in runs)
    assert 0.02 * drafted < accepted < 0.98 * drafted
    assert goodness_of_fit(counts, exact) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_trusting_the_head_fails_the_check(sharp_target, tmp_path, goodness_of_fit):
    counts, _, exact = sampling_case(sharp_target, tmp_path, 1_500, cls=TrustTheHead)
    assert goodness_of_fit(counts, exact) < 1e-6


# ---------------------------------------------------------------- the published layouts


def eagle_repository_folder(head: Eagle3Head, target, folder, *, specforge: bool = False):
    """The EAGLE repository's EAGLE-3 release (``pytorch_model.bin``, ``midlayer.*``, a Llama config with
    ``draft_vocab_size``), or SpecForge's export of the same keys as ``model.safetensors`` with the aux ids in
    ``eagle_config`` and the target's embedding copied in."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    c = head.config
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "vocab_size": c.vocab_size,
              "draft_vocab_size": c.draft_vocab_size, "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu",
              "max_position_embeddings": c.max_position_embeddings, "rope_theta": 10000.0, "bias": False,
              "torch_dtype": "float32"}
    state = {name: t.clone() for name, t in head.state_dict().items()}
    if specforge:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(c.aux_layers), "use_aux_hidden_state": True}
        state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().clone()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layout", ["speculators", "eagle-repository", "specforge"])
def test_each_layout_loads_and_drafts_like_the_source(target, trained, tmp_path, layout):
    if layout == "speculators":
        folder = tmp_path / "head"
        export(trained, target, folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["speculators_model_type"] == "eagle3"
        assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny-llama"
        assert config["eagle_aux_hidden_state_layer_ids"] == list(AUX) and config["draft_vocab_size"] == 64
    else:
        folder = eagle_repository_folder(trained, target, tmp_path / "head", specforge=layout == "specforge")
    loaded = load_head(folder, target.config, IDENTITY).eval()
    assert isinstance(loaded, Eagle3Head)
    assert loaded.aux_layers == AUX and torch.equal(loaded.vocab_ids(), trained.vocab_ids())
    aux = torch.randn(1, 5, 3 * 64)
    embedded = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(aux, embedded)), trained.logits(trained(aux, embedded)))
    expected = generate(Baseline(), target, PROMPTS[1], 24).tokens
    generation = generate(SpeculativeSampling(3, drafter=EagleDrafter(str(folder))), target, PROMPTS[1], 24)
    assert generation.tokens == expected and generation.stats.accepted_tokens > 0


def test_round_trip_export_load_same_drafts(target, trained, tmp_path):
    """export -> load -> export again: the same bytes of weights, the same drafts."""
    first = export(trained, target, tmp_path / "a")
    again = load_head(first, target.config, IDENTITY)
    second = export(again, target, tmp_path / "b")
    from safetensors.torch import load_file

    one, two = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert {"layers.0.self_attn.q_proj.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(one)
    assert one["fc.weight"].shape == (64, 3 * 64) and one["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * 64
    assert one["d2t"].dtype == torch.int64 and one["t2d"].dtype == torch.bool and one["t2d"].sum() == 64


# ---------------------------------------------------------------- refusals, one line each, before any decoding


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_head_for_another_target_is_refused(target, trained, tmp_path):
    path = export(trained, target, tmp_path / "head")
    other = build_tiny_llama(seed=1, num_layers=6)
    other.config.hidden_size = 96  # a wider target: its fc would not fit
    with pytest.raises(IncompatibleModelsError, match="hidden_size=64 but this target has 96") as error:
        load_head(path, other.config, IDENTITY)
    one_line(error)
    with pytest.raises(IncompatibleModelsError, match=r"verifier 'tiny-llama'.*'meta-llama/Llama-3\.1-8B'") as error:
        load_head(path, target.config, {**IDENTITY, "name": "meta-llama/Llama-3.1-8B"})
    one_line(error)


def test_bad_files_are_refused(target, trained, tmp_path):
    path = tmp_path / "head"
    export(trained, target, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(MalformedInputError, match="not a readable safetensors file") as error:
        load_head(path, target.config, IDENTITY)
    one_line(error)

    from safetensors.torch import load_file, save_file

    weights.write_bytes(data)
    state = load_file(str(weights))
    state["d2t"] = state["d2t"] + 200  # maps draft ids beyond the 128-id vocabulary
    save_file(state, str(weights))
    with pytest.raises(IncompatibleModelsError, match="outside this target's vocabulary of 128") as error:
        load_head(path, target.config, IDENTITY)
    one_line(error)

    weights.write_bytes(data)
    config = json.loads((path / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [2, 15, 27]  # a 30-layer target's
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelsError, match=r"reads target layers \[2, 15, 27\] but this target has 6 layers"):
        load_head(path, target.config, IDENTITY)

    for change, message in (({"norm_before_fc": True}, "norm_before_fc=true"),
                            ({"transformer_layer_config": {**config["transformer_layer_config"],
                                                           "num_hidden_layers": 2}}, "2-layer draft")):
        (path / "config.json").write_text(json.dumps({**config, "eagle_aux_hidden_state_layer_ids": list(AUX),
                                                      **change}))
        with pytest.raises(MalformedInputError, match=message) as error:
            load_head(path, target.config, IDENTITY)
        one_line(error)


def test_unknown_layout_names_the_known_ones(target, tmp_path):
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"], "num_hidden_layers": 4,
                                                    "hidden_size": 64}))
    with pytest.raises(MalformedInputError, match="speculators eagle3 folder") as error:
        load_head(folder, target.config)
    one_line(error)
    (folder / "config.json").write_text(json.dumps({"speculators_model_type": "mlp_speculator"}))
    with pytest.raises(MalformedInputError, match="mlp_speculator.*not supported"):
        load_head(folder, target.config)


def test_config_refusals(target):
    with pytest.raises(InvalidParameterError, match="two or more target layer ids"):
        Eagle3Config.for_target(target.config, aux_layers=(1,))
    with pytest.raises(InvalidParameterError, match="at least 4 layers"):
        default_aux_layers(2)
    assert default_aux_layers(30) == (2, 15, 27) and default_aux_layers(32) == (2, 16, 29)
    with pytest.raises(InvalidParameterError, match="ascending and unique"):
        Eagle3Head(Eagle3Config.for_target(target.config, draft_vocab_size=2, aux_layers=AUX),
                   draft_ids=torch.tensor([5, 3]))


def test_verification_forward_hands_over_the_aux_states(target):
    """layer_features = the inputs of the named layers (transformers' hidden_states[i]), from the same forward."""
    ids = torch.tensor([[1, 5, 9, 4]])
    seen = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for i, layer in enumerate(target.model.layers)]
    try:
        logits, hidden, features = model_logits_and_hidden(target, ids, new_cache(), feature_layers=(1, 0))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(features, torch.cat([seen[1], seen[0]], -1))
    assert hidden.shape == (1, 4, 64) and logits.shape[:2] == (1, 4)
    with pytest.raises(InvalidParameterError, match=r"must lie in \[0, 5\]"):
        model_logits_and_hidden(target, ids, new_cache(), feature_layers=(0, 6))


# ---------------------------------------------------------------- the embedded SmolLM2


@pytest.mark.slow
def test_embedded_greedy_equals_baseline_chain_and_tree(embedded_target, tmp_path):
    """SmolLM2 (fp32), 10 MT-Bench + 10 Spec-Bench prompts, 128 tokens: an EAGLE-3 head over 8192 draft ids,
    trained briefly on the target's own answers to two of them and exported in the speculators format, drafts
    for a chain (k=2) and a tree (budget 8, depth 4); both reproduce the baseline's tokens on every prompt."""
    from collections import Counter

    from test_drafters import embedded_cases, logit_margin
    from test_eagle_drafter import GREEDY, chat_ids

    from src.results.records import first_divergence

    model, tokenizer = embedded_target.model, embedded_target.tokenizer
    eos = {tokenizer.eos_token_id}
    cases = [(label, chat_ids(tokenizer, text)) for label, text in embedded_cases(mt_bench=10, spec_bench=10)]
    expected = {label: Baseline().generate(model, None, ids, 128, GREEDY, eos).tokens for label, ids in cases}
    head = new_head(model, torch.arange(0, 8192), aux_layers=default_aux_layers(model.config.num_hidden_layers))
    train_head(head, model, [cases[i][1][0].tolist() + expected[cases[i][0]] for i in (0, 1)], steps=40)
    folder = export(head, model, tmp_path / "head")
    methods = {"chain": SpeculativeSampling(2, drafter=EagleDrafter(folder)),
               "tree": SpecExec(budget=8, max_depth=4, drafter=EagleDrafter(folder))}
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
