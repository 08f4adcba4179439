"""AutoJudge: label mining (against a naive re-implementation), features, the label store, threshold selection,
the judge files, decoding with a judge, and fit on a tiny label set."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_llama, perturbed_copy

from src.data.mining import (
    IMPORTANT,
    UNIMPORTANT,
    LabelStore,
    continuation_budget,
    mine_prompts,
)
from src.decoding.autojudge import AutoJudge
from src.decoding.baseline import Baseline
from src.decoding.sampling import SamplingConfig
from src.decoding.speculative import SpeculativeSampling
from src.errors import IncompatibleModelsError, InvalidParameterError, MissingInputError
from src.models.judge import STATS_FEATURES, Judge, JudgeHead, select_threshold

PROMPT = [1, 17, 33, 5, 90]
EOS = {2}
TARGET_INFO = {"name": "tiny-target", "dtype": "float32", "quantization": "none", "device": "cpu"}
DRAFT_INFO = {"name": "tiny-draft", "dtype": "float32", "quantization": "none", "device": "cpu"}


@pytest.fixture(scope="module")
def noisy_pair():
    """A tiny Llama and a copy noisy enough to disagree on many greedy tokens."""
    target = build_tiny_llama(seed=3)
    return target, perturbed_copy(target, noise=0.05, seed=4)


def answer_mod(tokens: list[int]) -> str | None:
    """A known answer function: the sum of the answer's tokens modulo 4 (None for an empty answer)."""
    return str(sum(tokens) % 4) if tokens else None


# ---------------------------------------------------------------- naive reference


@torch.no_grad()
def naive_greedy(model, prefix: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation: no cache, no batching."""
    out: list[int] = []
    while len(out) < n and (not out or out[-1] not in EOS):
        logits = model(input_ids=torch.tensor([prefix + out])).logits
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
def naive_mine(target, draft, prompt, n, max_mismatches):
    """Every mismatch of the draft against the target's own answer, labelled by a one-at-a-time continuation."""
    answer = naive_greedy(target, prompt, n)
    reference = answer_mod(answer)
    logits = draft(input_ids=torch.tensor([prompt + answer])).logits[0]
    predicted = [int(logits[len(prompt) - 1 + i].argmax()) for i in range(len(answer))]
    found = [i for i in range(len(answer)) if predicted[i] != answer[i]]
    labels = []
    for pos in found[:max_mismatches]:
        token = predicted[pos]
        budget = 0 if token in EOS else continuation_budget(len(answer), pos, n)
        tail = naive_greedy(target, prompt + answer[:pos] + [token], budget)
        capped = len(tail) >= budget and budget < n - pos - 1
        same = not capped and answer_mod(answer[:pos] + [token] + tail) == reference
        labels.append((pos, token, answer[pos], UNIMPORTANT if same else IMPORTANT))
    return labels, answer, len(found)


# ---------------------------------------------------------------- mining

PROMPTS = [PROMPT, [1, 9, 9], [1, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("max_mismatches,fork_batch", [(1, 64), (4, 5), (50, 7)])
def test_mining_matches_a_naive_reference(noisy_pair, max_mismatches, fork_batch):
    target, draft = noisy_pair
    mined = mine_prompts(target, draft, PROMPTS, 24, EOS, answer_mod, max_mismatches, skip_unfinished=False,
                         fork_batch=fork_batch)
    kinds = set()
    for prompt, result in zip(PROMPTS, mined):
        expected_labels, expected_answer, found = naive_mine(target, draft, prompt, 24, max_mismatches)
        assert result.answer_tokens == expected_answer and result.found == found
        assert [(m.position, m.draft_token, m.target_token, m.label) for m in result.mismatches] == expected_labels
        kinds |= {m.label for m in result.mismatches}
    if max_mismatches == 50:  # whole answers: both kinds of mismatch occur
        assert kinds == {IMPORTANT, UNIMPORTANT}


def test_features_and_stats_are_read_on_the_sequence_holding_the_draft_token(noisy_pair):
    target, draft = noisy_pair
    [mined] = mine_prompts(target, draft, [PROMPT], 24, EOS, answer_mod, 3, skip_unfinished=False)
    assert len(mined.mismatches) == 3
    answer = mined.answer_tokens
    for m in mined.mismatches:
        ids = torch.tensor([PROMPT + answer[: m.position] + [m.draft_token]])
        with torch.no_grad():
            target_out = target(input_ids=ids, output_hidden_states=True)
            draft_out = draft(input_ids=ids, output_hidden_states=True)
        assert m.target_hidden.shape == (64,) and m.draft_hidden.shape == (64,)
        torch.testing.assert_close(m.target_hidden, target_out.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.draft_hidden, draft_out.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)
        p, q = target_out.logits[0, -2].softmax(-1), draft_out.logits[0, -2].softmax(-1)  # the row before the token
        assert list(m.stats) == list(STATS_FEATURES)
        assert m.stats["p_target_token"] == pytest.approx(float(p.max()), abs=1e-5)  # R is the target's argmax
        assert m.stats["p_draft_token"] == pytest.approx(float(p[m.draft_token]), abs=1e-5)
        assert m.stats["q_draft_token"] == pytest.approx(float(q.max()), abs=1e-5)  # the draft's argmax
        assert m.stats["q_target_token"] == pytest.approx(float(q[m.target_token]), abs=1e-5)
        assert m.stats["entropy_p"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
        assert m.stats["position"] == m.position and m.stats["position_share"] == pytest.approx(m.position / len(answer), abs=1e-6)


def test_a_seeded_sample_when_a_prompt_has_more_mismatches(noisy_pair):
    target, draft = noisy_pair
    [everything] = mine_prompts(target, draft, [PROMPT], 24, EOS, answer_mod, 50, skip_unfinished=False)
    sampled = [mine_prompts(target, draft, [PROMPT], 24, EOS, answer_mod, 3, seeds=[seed], skip_unfinished=False)[0]
               for seed in (1, 1, 2)]
    positions = [[m.position for m in s.mismatches] for s in sampled]
    assert everything.found > 3 and all(len(p) == 3 and p == sorted(p) for p in positions)
    assert set(positions[0]) <= {m.position for m in everything.mismatches}
    assert positions[0] == positions[1] != positions[2]  # a seed fixes the sample; another seed changes it
    by_position = {m.position: m.label for m in everything.mismatches}
    assert all(by_position[m.position] == m.label for m in sampled[2].mismatches)  # labels do not depend on it


def test_no_answer_stops_before_any_label(noisy_pair):
    target, draft = noisy_pair
    [mined] = mine_prompts(target, draft, [PROMPT], 12, EOS, lambda tokens: None, skip_unfinished=False)
    assert mined.stopped_by == "no_answer" and not mined.mismatches


# ---------------------------------------------------------------- store


def test_store_round_trip_resume_and_a_killed_prompt(noisy_pair, tmp_path):
    target, draft = noisy_pair
    store = LabelStore(tmp_path / "labels")
    meta = {"target": TARGET_INFO, "draft": DRAFT_INFO}
    store.open(meta)
    first, second = mine_prompts(target, draft, [PROMPT, [1, 9, 9]], 16, EOS, answer_mod, 3, skip_unfinished=False)
    store.add("a", first, 1.0)
    store.add("b", second, 1.0)
    # a run killed after writing prompt c's labels but before its prompt row: c is not finished
    with (store.root / "labels.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt_id": "c", "position": 0, "draft_token": 1, "target_token": 2, "label": 1,
                                 "shard": "shards/none.safetensors", "row": 0}) + "\n")
    assert set(store.finished_prompts()) == {"a", "b"}
    labels = store.load()
    assert len(labels) == len(first.mismatches) + len(second.mismatches)
    assert labels.stats.shape == (len(labels), len(STATS_FEATURES))
    assert labels.stats[0].tolist() == pytest.approx([first.mismatches[0].stats[k] for k in STATS_FEATURES], abs=1e-6)
    assert labels.prompt_ids.count("a") == len(first.mismatches)
    torch.testing.assert_close(labels.draft_hidden[0], first.mismatches[0].draft_hidden)
    assert labels.labels.tolist() == [float(m.label) for m in first.mismatches + second.mismatches]
    store.open(meta)  # same settings: reopened
    with pytest.raises(IncompatibleModelsError, match="draft differ.*delete it"):
        store.open({"target": TARGET_INFO, "draft": {**DRAFT_INFO, "quantization": "bnb-4bit-nf4"}})


# ---------------------------------------------------------------- threshold and judge files


def test_threshold_keeps_the_recall_target():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.35, 0.15])
    labels = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    # 10 important scores; recall >= 0.9 needs 9 of them >= t: the largest such t is the 9th highest, 0.1
    assert select_threshold(scores, labels, 0.9) == pytest.approx(0.1)
    assert select_threshold(scores, labels, 1.0) == pytest.approx(0.05)
    assert select_threshold(scores, labels, 0.5) == pytest.approx(0.5)
    assert select_threshold(scores, torch.zeros(12), 0.9) == 1.0
    with pytest.raises(InvalidParameterError, match="recall_target=0"):
        select_threshold(scores, labels, 0.0)


def make_judge(threshold: float, layout: str = "draft+target", bias: float = 0.0) -> Judge:
    head = JudgeHead(128 if layout == "draft+target" else 64)
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(bias)
    return Judge(head, threshold, layout, TARGET_INFO, DRAFT_INFO)


def test_judge_files_round_trip_and_refuse_another_pair(tmp_path):
    judge = make_judge(0.3, bias=1.5)
    judge.head.net.weight.data.normal_()
    judge.head.set_standardization(torch.randn(128), torch.rand(128) + 0.5)
    judge.save(tmp_path / "judge")
    loaded = Judge.load(tmp_path / "judge")
    x_d, x_t = torch.randn(5, 64), torch.randn(5, 64)
    torch.testing.assert_close(loaded.score(x_d, x_t), judge.score(x_d, x_t))
    assert loaded.threshold == 0.3 and loaded.feature_layout == "draft+target"
    loaded.check_pair(TARGET_INFO, {**DRAFT_INFO, "device": "cuda:0"})  # the device does not matter
    with pytest.raises(IncompatibleModelsError, match="trained for draft.*tiny-draft.*other-draft"):
        loaded.check_pair(TARGET_INFO, {**DRAFT_INFO, "name": "other-draft"})
    with pytest.raises(MissingInputError, match="python -m src fit --config configs/autojudge.yaml"):
        Judge.load(tmp_path / "nothing")


# ---------------------------------------------------------------- decoding


def autojudge_with(judge: Judge, k: int = 3) -> AutoJudge:
    method = AutoJudge(k=k)
    method.judge = judge
    return method


@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_judge_that_lets_nothing_through_is_greedy_speculative_decoding(noisy_pair, k):
    target, draft = noisy_pair
    input_ids = torch.tensor([PROMPT])
    never = autojudge_with(make_judge(threshold=0.0), k)  # P(important) >= 0 always: every mismatch is important
    ours = never.generate(target, draft, input_ids, 40, SamplingConfig(), EOS)
    speculative = SpeculativeSampling(k).generate(target, draft, input_ids, 40, SamplingConfig(), EOS)
    baseline = Baseline().generate(target, None, input_ids, 40, SamplingConfig(), EOS)
    assert ours.tokens == speculative.tokens == baseline.tokens
    assert ours.stats.accepted_per_step == speculative.stats.accepted_per_step
    assert ours.stats.extra["judge_accepted"] == 0
    assert ours.stats.extra["exact_accepted_tokens"] == ours.stats.accepted_tokens


def test_a_judge_that_lets_everything_through_keeps_every_draft(noisy_pair):
    target, draft = noisy_pair
    always = autojudge_with(make_judge(threshold=1.0, bias=-20.0), k=4)  # P(important) ~ 0 < 1
    generation = always.generate(target, draft, torch.tensor([PROMPT]), 41, SamplingConfig(), set())
    stats = generation.stats
    assert stats.accepted_per_step == [4] * 8 + [0]  # 8 cycles of 4 drafts + 1 target token, then 1 token left
    assert stats.target_calls == 9 and generation.new_tokens == 41
    # accepted = exact prefix + mismatches let through + matches after a let-through mismatch
    assert 0 < stats.extra["judge_accepted"] <= stats.accepted_tokens - stats.extra["exact_accepted_tokens"]
    assert stats.extra["accepted_per_cycle_mean"] == pytest.approx(32 / 9)
    assert generation.tokens != Baseline().generate(target, None, torch.tensor([PROMPT]), 41, SamplingConfig(), set()).tokens


def test_target_only_layout_and_threshold_override(noisy_pair):
    target, draft = noisy_pair
    method = AutoJudge(k=2, threshold=0.9)
    method.judge = make_judge(threshold=0.1, layout="target", bias=0.0)  # P(important) = 0.5
    generation = method.generate(target, draft, torch.tensor([PROMPT]), 20, SamplingConfig(), EOS)
    assert method.effective_threshold == 0.9 and generation.stats.extra["judge_accepted"] > 0


def test_autojudge_refuses_sampling_and_bad_parameters(noisy_pair):
    target, draft = noisy_pair
    method = autojudge_with(make_judge(0.5))
    with pytest.raises(InvalidParameterError, match="temperature=0.7: set temperature 0"):
        method.generate(target, draft, torch.tensor([PROMPT]), 8, SamplingConfig(temperature=0.7), EOS)
    with pytest.raises(InvalidParameterError, match="threshold=1.5"):
        AutoJudge(threshold=1.5)
    with pytest.raises(InvalidParameterError, match="k=0"):
        AutoJudge(k=0)


def test_prepare_loads_the_judge_and_checks_the_pair(tmp_path):
    make_judge(0.4).save(tmp_path / "judge")
    method = AutoJudge(judge_path=str(tmp_path / "judge"))
    method.prepare(TARGET_INFO, DRAFT_INFO)
    assert method.effective_threshold == 0.4
    with pytest.raises(IncompatibleModelsError):
        AutoJudge(judge_path=str(tmp_path / "judge")).prepare({**TARGET_INFO, "name": "big"}, DRAFT_INFO)


# ---------------------------------------------------------------- fit


def write_label_store(root, prompt_ids: list[str], per_prompt: int = 12, seed: int = 0) -> None:
    """A store of separable labels: a mismatch is important when its first target feature is positive; the cheap
    features are noise except ``p_target_token``, which leans (weakly) towards important labels."""
    from src.data.mining import MinedPrompt, Mismatch

    generator = torch.Generator().manual_seed(seed)
    store = LabelStore(root)
    store.open({"target": TARGET_INFO, "draft": DRAFT_INFO})
    for prompt_id in prompt_ids:
        mismatches = []
        for position in range(per_prompt):
            draft_hidden, target_hidden = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
            label = IMPORTANT if target_hidden[0] > 0 else UNIMPORTANT
            stats = dict(zip(STATS_FEATURES, torch.rand(len(STATS_FEATURES), generator=generator).tolist()))
            stats["p_target_token"] = 0.3 * label + 0.7 * stats["p_target_token"]
            mismatches.append(Mismatch(position, 3, 4, label, draft_hidden, target_hidden, stats))
        store.add(prompt_id, MinedPrompt("7", [1], mismatches), 0.1)


def test_fit_trains_and_exports_a_loadable_judge(tmp_path, monkeypatch):
    from conftest import ROOT

    from src.cli import cli_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])
    questions = tmp_path / "train.jsonl"
    questions.write_text("".join(
        json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
        for i in range(8)
    ))
    write_label_store(tmp_path / "labels", [f"q{i}" for i in range(8)])
    judge_path = tmp_path / "judge"
    cli_main([
        "fit", "--config", "configs/autojudge.yaml", "--data.mine_path", str(questions),
        "--data.mine_prompts", "8", "--data.store_dir", str(tmp_path / "labels"), "--data.batch_size", "16",
        "--model.judge_path", str(judge_path), "--model.learning_rate", "0.05", "--trainer.max_epochs", "40",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"),
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
    ])
    judge = Judge.load(judge_path)
    assert judge.target == {k: TARGET_INFO[k] for k in ("name", "dtype", "quantization")}
    assert judge.head.in_features == 16 and judge.feature_layout == "draft+target"
    assert judge.metrics["val_auroc"] > 0.9  # the labels are a linear function of one feature
    assert judge.metrics["val_recall_important"] >= 0.9
    # 20% of 8 prompts -> 2 validation and 2 test prompts of 12 mismatches each, split by prompt
    assert (judge.metrics["train_labels"], judge.metrics["val_labels"], judge.metrics["test_labels"]) == (48, 24, 24)
    metrics_csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "val_auroc" in metrics_csv and "train_loss" in metrics_csv and "test_auroc" in metrics_csv
    evaluation = json.loads((tmp_path / "judge.evaluation.json").read_text())
    judges = {row["judge"]: row for row in evaluation["judges"]}
    assert judges["trained judge"]["auroc"] == judge.metrics["test_auroc"] > 0.75  # 24 held-out labels
    assert judges["always important"]["auroc"] == 0.5
    assert {"target top-1 probability", "cheap features (logistic)"} <= set(judges)
    assert evaluation["learning_curve"][-1]["train_labels"] == 48


def test_split_is_by_prompt_never_by_token(tmp_path):
    from src.lit.judge import JudgeDataModule

    write_label_store(tmp_path / "labels", [f"p{i}" for i in range(10)], per_prompt=5)
    data = JudgeDataModule(store_dir=str(tmp_path / "labels"), val_fraction=0.3, test_fraction=0.2)
    labels = data.store.load()
    splits = data.split_by_prompt(labels)
    prompts = [{labels.prompt_ids[i] for i in rows.tolist()} for rows in splits]
    assert [len(p) for p in prompts] == [5, 3, 2] and sum(len(rows) for rows in splits) == 50
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    with pytest.raises(InvalidParameterError, match="val_fraction \\+ test_fraction = 1 leaves no training"):
        JudgeDataModule(val_fraction=0.5, test_fraction=0.5)


def test_too_few_labels_of_one_class_name_the_split_and_the_fix(tmp_path):
    from src.data.mining import MinedPrompt, Mismatch
    from src.lit.judge import JudgeDataModule

    store = LabelStore(tmp_path / "labels")
    store.open({"target": TARGET_INFO, "draft": DRAFT_INFO})
    for i in range(10):  # every label important
        store.add(f"p{i}", MinedPrompt("7", [1], [Mismatch(0, 3, 4, IMPORTANT, torch.zeros(4), torch.zeros(4))]), 0.1)
    data = JudgeDataModule(store_dir=str(tmp_path / "labels"))
    with pytest.raises(MissingInputError, match="train split has 6 important and 0 unimportant.*mine_prompts"):
        data.setup("fit")


def test_an_answer_cut_by_the_token_limit_is_skipped(noisy_pair):
    target, draft = noisy_pair
    [cut] = mine_prompts(target, draft, [PROMPT], 12, EOS, answer_mod)
    assert cut.stopped_by == "unfinished" and not cut.mismatches
    first = naive_greedy(target, PROMPT, 1)[0]
    [finished] = mine_prompts(target, draft, [PROMPT], 12, {first}, answer_mod)
    assert finished.stopped_by != "unfinished" and finished.answer_tokens == [first]


def test_answers_are_compared_with_the_baseline_answer():
    from src.results.records import compare_with_baseline

    def record(method, answer, tokens):
        return {"method": method, "status": "ok", "tokens_per_s": 1.0, "tokens": tokens, "answer": answer}

    records = [record("baseline", "12", [1, 2]), record("autojudge", "12", [1, 3]), record("speculative", None, [1, 2]),
               record("autojudge[threshold=0.8]", "13", [1, 4])]
    compare_with_baseline(records, greedy=True)
    assert [r.get("answer_matches_baseline") for r in records[1:]] == [True, False, False]
    assert records[1]["matches_baseline"] is False and records[1]["first_divergence"] == 1


def test_a_gsm8k_file_without_final_answers_is_refused_in_one_line(tmp_path):
    from src.errors import MalformedInputError
    from src.lit.judge import JudgeDataModule

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"it is {i + 1}"}) + "\n" for i in range(3)))
    with pytest.raises(MalformedInputError, match="none of its 3 answers ends with a GSM8K final answer '#### <number>'"):
        JudgeDataModule(path=str(bad)).load_prompts()
    with pytest.raises(MalformedInputError, match=f"{bad.name}: none of its 3 answers"):
        JudgeDataModule(mine_path=str(bad)).mining_prompts()
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text() + json.dumps({"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    assert [p.answer for p in JudgeDataModule(path=str(good)).load_prompts()] == ["1", "2", "3", "4"]
