"""Prompt files: reading, filtering and the errors that name the bad line or value."""

import json

import pytest

from src.data.prompts import read_prompt_file, select_prompts
from src.errors import InvalidParameterError, MalformedInputError, MissingInputError
from src.lit.data import PromptDataModule


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompt_file(tmp_path):
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2+2?"], "reference": ["4"]},
        {"question_id": 3, "category": "writing", "turns": ["Write a story."]},
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_reads_mt_bench_format(prompt_file):
    prompts = read_prompt_file(prompt_file)
    assert [p.prompt_id for p in prompts] == ["1", "2", "3"]
    assert prompts[0].turns == ["Write a poem.", "Shorter."]
    assert prompts[1].reference == ["4"] and prompts[1].dataset == "prompts"


def test_filters_by_category_and_limit(prompt_file):
    prompts = select_prompts(read_prompt_file(prompt_file), ["writing"], 1, "x")
    assert [p.prompt_id for p in prompts] == ["1"]


def test_unknown_category_lists_present_ones(prompt_file):
    with pytest.raises(InvalidParameterError, match=r"unknown categories \['poetry'\].*\['math', 'writing'\]"):
        select_prompts(read_prompt_file(prompt_file), ["poetry"], None, "x")


def test_missing_file_mentions_setup(tmp_path):
    with pytest.raises(MissingInputError, match="make setup"):
        read_prompt_file(tmp_path / "absent.jsonl")


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": [\n')
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl:2"):
        read_prompt_file(path)


def test_datamodule_yields_one_prompt_per_step(prompt_file):
    data = PromptDataModule(path=str(prompt_file), limit=2)
    data.setup("predict")
    items = list(data.predict_dataloader())
    assert len(items) == 2
    assert items[0]["prompt_id"] == "1" and items[0]["chat_template"] is True
    expected_keys = {"prompt_id", "category", "turns", "dataset", "reference", "answer"}
    expected_keys |= {"num_turns", "chat_template", "system_prompt", "max_prompt_tokens"}
    assert set(items[0]) == expected_keys
    assert items[0]["answer"] is None  # MT-Bench has no gold answer


def test_gsm8k_rows_carry_the_normalized_answer(tmp_path):
    rows = [
        {"question": "How many?", "answer": "48 / 2 = <<48/2=24>>24\n#### 1,000"},
        {"question": "And now?", "answer": "Half of 7 is 3.5\n#### 3.50"},
    ]
    prompts = read_prompt_file(write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert [p.answer for p in prompts] == ["1000", "3.5"]
    assert prompts[0].reference == [rows[0]["answer"]]  # the full solution stays the reference


def test_jsonl_answer_field_is_optional(tmp_path):
    rows = [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "2+2?", "answer": 4}, {"prompt": "Hi"}]
    prompts = read_prompt_file(write_jsonl(tmp_path / "free.jsonl", rows))
    assert [p.answer for p in prompts] == ["Paris", "4", None]


def test_datamodule_reads_synthetic_arithmetic(tmp_path):
    data = PromptDataModule(path="synthetic:arithmetic:test", limit=7, seed=5)
    data.setup("predict")
    items = list(data.predict_dataloader())
    assert len(items) == 7
    assert [item["prompt_id"] for item in items[:2]] == ["arith-s5-test-0", "arith-s5-test-1"]
    for item in items:
        assert item["dataset"] == "synthetic_arithmetic" and item["answer"].isdigit()
        assert item["turns"][0].endswith('"The answer is <number>."') and item["num_turns"] == 1


def test_datamodule_synthetic_defaults_and_categories():
    data = PromptDataModule(path="synthetic:arithmetic")
    prompts = data.load_prompts()
    assert len(prompts) == 100 and prompts[0].prompt_id == "arith-s0-train-0"
    filtered = PromptDataModule(path="synthetic:arithmetic", categories=["reading", "groups"], limit=6).load_prompts()
    assert len(filtered) == 6 and {p.category for p in filtered} <= {"reading", "groups"}


def test_datamodule_unknown_synthetic_task_lists_known_ones():
    with pytest.raises(InvalidParameterError, match=r"unknown synthetic task 'trivia'.*synthetic:arithmetic"):
        PromptDataModule(path="synthetic:trivia").load_prompts()


def test_shared_mt_bench_file_reads(mt_bench_path):
    prompts = read_prompt_file(mt_bench_path)
    assert len(prompts) == 80
    assert len({p.category for p in prompts}) == 8


@pytest.fixture
def three_categories(tmp_path):
    # file order: ids 1-3 writing, 4-5 math, 6 coding
    categories = ["writing", "writing", "writing", "math", "math", "coding"]
    rows = [{"question_id": i, "category": c, "turns": [f"q{i}"]} for i, c in enumerate(categories, start=1)]
    return write_jsonl(tmp_path / "three.jsonl", rows)


def test_limit_spreads_over_categories_round_robin(three_categories):
    prompts = select_prompts(read_prompt_file(three_categories), None, 4, "x")
    assert [p.prompt_id for p in prompts] == ["1", "4", "6", "2"]  # first of each, then the second writing one
    data = PromptDataModule(path=str(three_categories), limit=5)
    assert [p.prompt_id for p in data.load_prompts()] == ["1", "4", "6", "2", "5"]


def test_limit_order_file_keeps_file_order(three_categories):
    prompts = select_prompts(read_prompt_file(three_categories), None, 4, "x", limit_order="file")
    assert [p.prompt_id for p in prompts] == ["1", "2", "3", "4"]
    data = PromptDataModule(path=str(three_categories), limit=4, limit_order="file")
    assert [p.prompt_id for p in data.load_prompts()] == ["1", "2", "3", "4"]


def test_no_limit_keeps_file_order(three_categories):
    prompts = select_prompts(read_prompt_file(three_categories), None, None, "x")
    assert [p.prompt_id for p in prompts] == ["1", "2", "3", "4", "5", "6"]


def test_prompts_without_category_count_as_one(tmp_path):
    path = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "category": "x"}])
    assert [p.prompt_id for p in select_prompts(read_prompt_file(path), None, 2, "x")] == ["1", "3"]


def test_invalid_limit_order_names_value_and_choices(three_categories):
    with pytest.raises(InvalidParameterError, match=r"limit_order='sorted'.*'round_robin', 'file'"):
        PromptDataModule(path=str(three_categories), limit_order="sorted")
    with pytest.raises(InvalidParameterError, match=r"limit_order='sorted'"):
        select_prompts(read_prompt_file(three_categories), None, 2, "x", limit_order="sorted")


def test_shuffle_then_round_robin_is_deterministic(three_categories):
    rows = read_prompt_file(three_categories)
    # seed 0 shuffles to math, writing, writing, ...: the first three alone would miss coding
    first = select_prompts(rows, None, 3, "x", shuffle=True, seed=0)
    again = select_prompts(read_prompt_file(three_categories), None, 3, "x", shuffle=True, seed=0)
    assert [p.prompt_id for p in first] == [p.prompt_id for p in again]
    assert sorted(p.category for p in first) == ["coding", "math", "writing"]  # one of each category
    shuffled = select_prompts(rows, None, None, "x", shuffle=True, seed=0)
    order = list(dict.fromkeys(p.category for p in shuffled))  # categories in shuffled order of first appearance
    assert [p.category for p in first] == order
    assert first == [next(p for p in shuffled if p.category == c) for c in order]
