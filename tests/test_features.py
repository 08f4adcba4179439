"""EAGLE feature mining (src/data/features.py) on the tiny random Llama and a character-level chat tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_char_tokenizer, build_tiny_llama, dataset_file

from src.data.features import (
    Conversation,
    EncodedItem,
    FeatureDataset,
    FeatureStore,
    build_features,
    collate_sequences,
    feature_meta,
    generate_answers,
    in_val_split,
    overlap_warning,
    read_conversations,
    read_questions,
)
from src.errors import IncompatibleModelsError, InvalidParameterError, MalformedInputError, MissingInputError

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(seed=0)


def chat(item_id: str, question: str, answer: str) -> Conversation:
    return Conversation(item_id, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


CONVERSATIONS = [
    chat("t:1", "What is 2+3?", "2+3 = 5\n#### 5"),
    chat("t:2", "Name a color.", "Blue."),
    chat("t:3", "Count to four, please.", "1, 2, 3, 4"),
    chat("t:4", "Hi", "Hello! How can I help you today?"),
    chat("t:5", "Say yes.", "yes"),
    chat("t:6", "Spell cat backwards.", "t-a-c"),
]


def open_store(root: Path, dtype: str = "float32", max_length: int = 1024) -> FeatureStore:
    store = FeatureStore(root)
    store.open(feature_meta({"name": "tiny-llama"}, feature_dtype=dtype, max_length=max_length, sources=["test"]))
    return store


def by_item(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    dataset = FeatureDataset(root, split="train", val_fraction=0.0)
    return {row["item_id"]: dataset[i] for i, row in enumerate(dataset.rows)}


def assert_same_content(a: Path, b: Path) -> None:
    items_a, items_b = by_item(a), by_item(b)
    assert items_a.keys() == items_b.keys()
    for item_id, x in items_a.items():
        y = items_b[item_id]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
        torch.testing.assert_close(x["features"], y["features"], rtol=1e-4, atol=1e-5)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- sources


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_gsm8k_source(tmp_path):
    path = write(tmp_path / "gsm.jsonl", [
        {"question": "Q1?", "answer": "48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "no answer here"},
        "",
        {"question": "Q3?", "answer": "x\n#### 3"},
    ])
    conversations = read_conversations(path)
    assert [c.item_id for c in conversations] == ["gsm:1", "gsm:4"] and conversations.skipped == 1
    assert conversations[0].messages == [
        {"role": "user", "content": "Q1?"},
        {"role": "assistant", "content": "48/2 = 24 clips.\n48+24 = 72\n#### 72"},
    ]
    assert len(read_conversations(path, limit=1)) == 1
    assert read_questions(path) == [("gsm:1", "Q1?"), ("gsm:2", "no answer here"), ("gsm:4", "Q3?")]


def test_mt_bench_source_uses_turn_one_and_reference_one(tmp_path):
    path = write(tmp_path / "mt.jsonl", [
        {"question_id": 101, "category": "reasoning", "turns": ["First?", "Second?"], "reference": ["A1", "A2"]},
        {"question_id": 102, "category": "writing", "turns": ["Write a poem."]},
        {"question_id": 103, "turns": ["Empty ref"], "reference": []},
    ])
    conversations = read_conversations(path)
    assert conversations.skipped == 2
    assert conversations == [chat("mt:101", "First?", "A1")]
    assert [q for _, q in read_questions(path)] == ["First?", "Write a poem.", "Empty ref"]


def test_messages_source(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    path = write(tmp_path / "chats.jsonl", [
        {"id": "a", "messages": messages},
        {"messages": messages[:2]},  # no answer
    ])
    conversations = read_conversations(path)
    assert conversations == [Conversation("chats:a", messages)] and conversations.skipped == 1
    item_id, read_messages = conversations[0]  # a tuple, as callers index it
    assert item_id == conversations[0][0] == "chats:a" and read_messages == messages


@pytest.mark.parametrize("line, expected", [
    ("{not json", "JSONDecodeError"),
    ({"prompt": "other format"}, "missing field"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"question_id": 1, "turns": []}, "turns"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, expected):
    path = write(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "ok"}, line])
    with pytest.raises(MalformedInputError) as error:
        read_conversations(path)
    assert f"{path}:2" in one_line(error) and expected in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError) as error:
        read_conversations(tmp_path / "absent.jsonl")
    assert "absent.jsonl does not exist" in one_line(error)


def test_shared_gsm8k_and_spec_bench_overlap():
    """The real files when present: annotations stripped; Spec-Bench's references include MT-Bench questions."""
    gsm8k = read_conversations(dataset_file("gsm8k_train.jsonl"), limit=5)
    assert len(gsm8k) == 5 and all("<<" not in c.messages[-1]["content"] for c in gsm8k)
    assert all("\n#### " in c.messages[-1]["content"] for c in gsm8k)
    spec_bench = read_conversations(dataset_file("spec_bench.jsonl"))
    mt_first_turns = [q for _, q in read_questions(dataset_file("mt_bench.jsonl"))]
    assert overlap_warning(spec_bench, mt_first_turns) is not None
    assert overlap_warning(gsm8k, mt_first_turns) is None


# ---------------------------------------------------------------- features


def test_features_are_the_post_norm_hidden_states(tmp_path, target, tokenizer):
    store = open_store(tmp_path / "store")
    stats = build_features(target, tokenizer, [tuple(CONVERSATIONS[0])], store)  # a plain tuple works too
    assert stats["items_done"] == 1 and stats["stopped"] is None
    item = FeatureDataset(store.root, val_fraction=0.0)[0]
    ids = item["input_ids"][None]  # (1, T)
    with torch.inference_mode():
        out = target(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(item["features"], out.hidden_states[-1][0], rtol=1e-5, atol=1e-5)
        greedy = target.lm_head(item["features"]).argmax(-1)  # (T,)
    assert torch.equal(greedy, out.logits[0].argmax(-1))
    # The feature of the last prompt token predicts the target's first generated token.
    start = int(item["loss_mask"].nonzero()[0])
    first = target.generate(input_ids=ids[:, :start], attention_mask=torch.ones_like(ids[:, :start]),
                            max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1]
    assert greedy[start - 1] == first


def test_default_store_is_bfloat16(tmp_path, target, tokenizer):
    store = FeatureStore(tmp_path / "store")
    store.open(feature_meta({"name": "tiny-llama"}, tokenizer=tokenizer))
    build_features(target, tokenizer, CONVERSATIONS[:2], store)
    from safetensors.torch import load_file

    shard = load_file(str(store.root / "shards" / "000000.safetensors"))
    assert shard["features"].dtype == torch.bfloat16 and shard["input_ids"].dtype == torch.int32
    assert shard["loss_mask"].dtype == torch.uint8 and shard["offsets"].tolist()[0] == 0
    assert shard["offsets"].tolist()[-1] == shard["input_ids"].numel() == shard["features"].shape[0]
    with torch.inference_mode():
        for row in FeatureDataset(store.root, val_fraction=0.0):
            expected = target(input_ids=row["input_ids"][None], output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(row["features"], expected, rtol=2e-2, atol=2e-2)


def test_loss_mask_marks_exactly_the_answer(tmp_path, target, tokenizer):
    conversations = [chat("m:1", "Why?", "Because."), chat("m:2", "A long question " * 3, "cut answer here")]
    store = open_store(tmp_path / "store", max_length=80)
    stats = build_features(target, tokenizer, conversations, store, max_length=80)
    items = by_item(store.root)
    whole = items["m:1"]
    answer = whole["input_ids"][whole["loss_mask"]].tolist()
    # Every answer token and the EOS after it are in the answer region; the last one has no next token there.
    assert tokenizer.decode(answer) == "Because."
    end = int(whole["loss_mask"].nonzero()[-1]) + 1
    assert whole["input_ids"][end] == tokenizer.eos_token_id and not whole["loss_mask"][end:].any()
    assert tokenizer.decode(whole["input_ids"][: end - len(answer)]).endswith("<|im_start|>assistant\n")
    cut = items["m:2"]
    assert len(cut["input_ids"]) == 80 and store.finished_items()["m:2"]["truncated"]
    assert tokenizer.decode(cut["input_ids"][cut["loss_mask"]]) == "cut answer her"[: int(cut["loss_mask"].sum())]
    assert stats["answer_tokens"] == int(whole["loss_mask"].sum() + cut["loss_mask"].sum())
    # A prompt that fills max_length leaves no answer pair: the item is counted, not stored.
    stats = build_features(target, tokenizer, [chat("m:3", "x" * 100, "y")], store, max_length=80)
    assert stats["items_unusable"] == 1 and stats["items_done"] == 0 and stats["items_skipped"] == 0


def test_resume_after_a_token_budget_equals_one_build(tmp_path, target, tokenizer):
    whole = open_store(tmp_path / "whole")
    build_features(target, tokenizer, CONVERSATIONS, whole, batch_size=2)
    resumed = open_store(tmp_path / "resumed")
    first = build_features(target, tokenizer, CONVERSATIONS, resumed, batch_size=2, token_budget=1)
    assert first["stopped"] == "token_budget" and first["items_done"] == 2 and first["items_left"] == 4
    assert "run build_features again" in first["message"]
    second = build_features(target, tokenizer, CONVERSATIONS, resumed, batch_size=2)
    assert second["items_skipped"] == 2 and second["items_done"] == 4 and second["stopped"] is None
    third = build_features(target, tokenizer, CONVERSATIONS, resumed, batch_size=3)
    assert third["items_done"] == 0 and third["items_skipped"] == 6
    rows = [json.loads(line) for line in (resumed.root / "items.jsonl").read_text().splitlines()]
    assert sorted(r["item_id"] for r in rows) == sorted(c.item_id for c in CONVERSATIONS)
    assert_same_content(whole.root, resumed.root)


def test_time_budget_stops(tmp_path, target, tokenizer):
    stats = build_features(target, tokenizer, CONVERSATIONS, open_store(tmp_path / "s"), time_budget_s=0)
    assert stats["stopped"] == "time_budget" and stats["items_done"] == 0 and stats["items_left"] == 6


def test_a_shard_without_rows_is_ignored_and_overwritten(tmp_path, target, tokenizer, monkeypatch):
    whole = open_store(tmp_path / "whole")
    build_features(target, tokenizer, CONVERSATIONS, whole, batch_size=2)
    store = open_store(tmp_path / "killed")
    build_features(target, tokenizer, CONVERSATIONS, store, batch_size=2, token_budget=1)  # shard 000000 + rows

    def killed(rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "_write_rows", lambda self, rows: killed(rows))
    with pytest.raises(KeyboardInterrupt):
        build_features(target, tokenizer, CONVERSATIONS, store, batch_size=2)
    monkeypatch.undo()
    orphan = store.root / "shards" / "000001.safetensors"
    assert orphan.is_file() and len(store.finished_items()) == 2
    with (store.root / "items.jsonl").open("a") as handle:
        handle.write('{"item_id": "t:')  # a row cut by the kill
    assert len(FeatureDataset(store.root, val_fraction=0.0)) == 2
    stats = build_features(target, tokenizer, CONVERSATIONS, FeatureStore(store.root), batch_size=2)
    assert stats["items_done"] == 4
    rows = [json.loads(line) for line in (store.root / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["shard"] for r in rows} == {f"shards/00000{i}.safetensors" for i in range(3)}
    assert_same_content(whole.root, store.root)


def test_a_store_with_other_settings_is_refused(tmp_path, target, tokenizer):
    open_store(tmp_path / "s", dtype="float32")
    with pytest.raises(IncompatibleModelsError) as error:
        FeatureStore(tmp_path / "s").open(feature_meta({"name": "other"}, feature_dtype="bfloat16", sources=["test"]))
    message = one_line(error)
    assert "feature_dtype, target differ" in message and "delete it or choose another dir" in message
    with pytest.raises(InvalidParameterError) as error:
        build_features(target, tokenizer, CONVERSATIONS, FeatureStore(tmp_path / "s"), max_length=64)
    assert "max_length=1024" in one_line(error)
    with pytest.raises(InvalidParameterError) as error:
        build_features(target, tokenizer, CONVERSATIONS, FeatureStore(tmp_path / "unopened"))
    assert "is not open" in one_line(error)
    with pytest.raises(InvalidParameterError, match="appears twice"):
        build_features(target, tokenizer, CONVERSATIONS[:1] * 2, FeatureStore(tmp_path / "s"))


# ---------------------------------------------------------------- reading back


def fake_store(root: Path, count: int, hidden: int = 4) -> FeatureStore:
    """``count`` items of lengths 3, 4, ... with random features, two per shard (no model needed)."""
    store = open_store(root)
    items = [EncodedItem(f"f:{i}", list(range(3 + i)), [0] + [1] * (1 + i) + [0], False) for i in range(count)]
    for first in range(0, count, 2):
        batch = items[first : first + 2]
        store.add_batch(batch, [torch.randn(len(item.input_ids), hidden) for item in batch])
    return store


def test_split_is_deterministic_and_never_shares_an_item(tmp_path):
    store = fake_store(tmp_path / "s", 12)
    train = FeatureDataset(store.root, "train", val_fraction=0.5)
    val = FeatureDataset(store.root, "val", val_fraction=0.5)
    train_ids, val_ids = [r["item_id"] for r in train.rows], [r["item_id"] for r in val.rows]
    assert train_ids and val_ids and not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(store.finished_items())
    assert [r["item_id"] for r in FeatureDataset(store.root, "val", val_fraction=0.5).rows] == val_ids
    assert all(in_val_split(i, 0.5) for i in val_ids)
    for dataset in (train, val):  # whole sequences
        for row, item in zip(dataset.rows, dataset):
            length = 3 + int(row["item_id"].split(":")[1])
            assert item["input_ids"].tolist() == list(range(length)) and item["features"].shape == (length, 4)
            assert item["loss_mask"].dtype == torch.bool and item["features"].dtype == torch.float32
    cut = FeatureDataset(store.root, "train", val_fraction=0.5, max_length=3)
    assert all(len(item["input_ids"]) <= 3 and not item["loss_mask"][-1] for item in cut)


def test_empty_store_or_empty_split_is_one_line_error(tmp_path):
    with pytest.raises(MissingInputError) as error:
        FeatureDataset(open_store(tmp_path / "empty").root)
    assert "no finished items" in one_line(error)
    store = fake_store(tmp_path / "few", 2)
    with pytest.raises(InvalidParameterError) as error:
        FeatureDataset(store.root, "val", val_fraction=0.0)
    assert "has 2 items and none falls in the val split" in one_line(error) and "mine more" in str(error.value)


def test_collate_pads_on_the_right(tmp_path):
    dataset = FeatureDataset(fake_store(tmp_path / "s", 2).root, val_fraction=0.0)
    short, long = sorted([dataset[0], dataset[1]], key=lambda item: len(item["input_ids"]))
    batch = collate_sequences([short, long])
    assert batch["input_ids"].shape == (2, 4) and batch["features"].shape == (2, 4, 4)
    assert batch["attention_mask"].tolist() == [[True, True, True, False], [True] * 4]
    assert batch["input_ids"][0].tolist() == [0, 1, 2, 0] and not batch["loss_mask"][0, 3]
    assert torch.equal(batch["features"][0, :3], short["features"]) and not batch["features"][0, 3].any()
    assert torch.equal(batch["features"][1], long["features"]) and torch.equal(batch["loss_mask"][1], long["loss_mask"])


def test_overlap_warning_counts_normalized_matches():
    evaluation = ["What is 2+3?", "Name   a\ncolor."]
    warning = overlap_warning(CONVERSATIONS, evaluation)
    assert warning is not None and warning.startswith("2 of 6 training conversations") and "\n" not in warning
    assert overlap_warning(CONVERSATIONS, ["What is 2+4?"]) is None


# ---------------------------------------------------------------- self-distillation


def test_generate_answers_batched_equals_one_by_one_and_resumes(tmp_path, target, tokenizer, monkeypatch):
    prompts = [("g:1", "Hello there"), ("g:2", "Hi"), ("g:3", "What is one plus one?")]
    single = generate_answers(target, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    store = open_store(tmp_path / "s")
    batched = generate_answers(target, tokenizer, prompts, max_new_tokens=6, batch_size=3, store=store)
    assert batched == single and [c.item_id for c in batched] == ["g:1", "g:2", "g:3"]
    assert all(c.messages[0] == {"role": "user", "content": text} for c, (_, text) in zip(batched, prompts))
    assert all("<|im" not in c.messages[-1]["content"] for c in batched)
    rows = [json.loads(line) for line in (store.root / "answers.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in rows] == ["g:1", "g:2", "g:3"]

    def no_generation(*args, **kwargs):
        raise AssertionError("answers were generated again")

    monkeypatch.setattr("src.data.features._generate_batch", no_generation)
    assert generate_answers(target, tokenizer, prompts, max_new_tokens=6, batch_size=2, store=store) == batched
    with pytest.raises(IncompatibleModelsError) as error:
        generate_answers(target, tokenizer, prompts, max_new_tokens=7, batch_size=2, store=store)
    assert "max_new_tokens differ" in one_line(error)


def test_sampled_answers_are_seeded(target, tokenizer):
    prompts = [("s:1", "Tell me a story"), ("s:2", "Go")]
    first = generate_answers(target, tokenizer, prompts, max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
    again = generate_answers(target, tokenizer, prompts, max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
    assert first == again
    greedy = generate_answers(target, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert first != greedy
