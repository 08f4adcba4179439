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
