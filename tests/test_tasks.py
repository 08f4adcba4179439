"""Answer extraction and the synthetic arithmetic task: the pieces AutoJudge needs to check a final answer."""

from __future__ import annotations

import ast
import operator
import re

import pytest

from src.data.answers import ANSWER_EXTRACTORS, answers_match, extract_answer, last_number, normalize_number
from src.data.tasks import (
    ANSWER_INSTRUCTION,
    ARITHMETIC_TEMPLATES,
    arithmetic_problems,
    iter_arithmetic_problems,
    read_synthetic,
)
from src.errors import InvalidParameterError

# ---- numbers and extractors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("$5", "5"),
        ("3.0", "3"),
        ("3.50", "3.5"),
        ("-2", "-2"),
        ("42.", "42"),
        ("  7 ", "7"),
        ("-$1,234.50", "-1234.5"),
        ("0.25", "0.25"),
        ("-0", "0"),
        ("abc", None),
        ("5 apples", None),
        ("1,2", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48 / 2 = 24 clips in May.\n#### 1,000", "1000"),  # the #### branch, commas removed
        ("#### 3\nlater: #### $72.00", "72"),  # the last ####
        ("Total 5 + 7 = 12. The answer is $12.", "12"),  # the phrase branch, dollar and period
        ("Answer: 7, not 8 or 9.", "7"),  # "answer:" takes the number right after it
        ("The answer is 3. Wait, the answer is 4.50 then 6", "4.5"),  # the last phrase
        ("I think 3 + 4 = 7", "7"),  # no marker: the last number
        ("I get 5 then 6\n#### ?", "6"),  # a #### without a number falls through
        ("The answer is unclear. I get 10 then 11", "10"),  # the phrase branch finds the next number
        ("So she has -3 left", "-3"),
        ("5-3 equals 2", "2"),  # a hyphen between numbers is no minus sign
        ("no numbers here", None),
    ],
)
def test_gsm8k_extractor_branches(text, expected):
    assert extract_answer(text) == expected
    assert ANSWER_EXTRACTORS["gsm8k"](text) == expected


def test_last_number_ignores_markers():
    assert last_number("#### 5 then 1,250.") == "1250"
    assert extract_answer("The answer is 4. Check: 2 * 2 = 4, plus 1 is 5", "last_number") == "5"
    assert last_number("nothing") is None


def test_unknown_extractor_lists_known_kinds():
    with pytest.raises(InvalidParameterError, match=r"unknown answer extractor 'regex'.*\['gsm8k', 'last_number'\]"):
        extract_answer("42", "regex")


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        ("1,000", "1000", True),
        ("3.50", "3.5", True),
        ("$18", "18.0", True),
        ("17", "18", False),
        ("-2", "2", False),
        (None, "5", False),
        ("5", None, False),
        (None, None, False),
        ("Paris", "Paris", False),  # numeric comparison only
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


# ---- the synthetic arithmetic task ------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Integers, + - * and parentheses only (anything else fails the test)."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def test_generator_is_deterministic_and_prefix_stable():
    first = arithmetic_problems(40, seed=3)
    assert first == arithmetic_problems(40, seed=3)
    assert arithmetic_problems(10, seed=3) == first[:10]  # the N-th prompt does not depend on count
    assert [p.turns for p in arithmetic_problems(40, seed=4)] != [p.turns for p in first]


def test_prompt_fields():
    prompts = arithmetic_problems(30, seed=0, split="test")
    assert [p.prompt_id for p in prompts[:2]] == ["arith-s0-test-0", "arith-s0-test-1"]
    assert {p.dataset for p in prompts} == {"synthetic_arithmetic"}
    assert {p.category for p in prompts} <= set(ARITHMETIC_TEMPLATES)
    for prompt in prompts:
        assert len(prompt.turns) == 1
        assert prompt.turns[0].endswith(" " + ANSWER_INSTRUCTION)
        assert ANSWER_INSTRUCTION.count(".") == 1 and '"The answer is <number>."' in ANSWER_INSTRUCTION
        assert extract_answer(prompt.reference[0]) == prompt.answer  # the reference ends in "#### <answer>"


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_train_and_test_are_disjoint(seed):
    train = {p.turns[0] for p in arithmetic_problems(300, seed=seed, split="train")}
    test = {p.turns[0] for p in arithmetic_problems(300, seed=seed, split="test")}
    assert len(train) == 300 and len(test) == 300  # no duplicates within a split
    assert not train & test
    other_seed_test = {p.turns[0] for p in arithmetic_problems(300, seed=seed + 1, split="test")}
    assert not train & other_seed_test


def test_answers_are_correct_and_small():
    problems = [problem for _, problem in zip(range(400), iter_arithmetic_problems(seed=7, split="train"))]
    assert {p.template for p in problems} == set(ARITHMETIC_TEMPLATES)  # every template shows up
    for problem in problems:
        assert evaluate(problem.expression) == problem.answer, problem
        assert 0 <= problem.answer <= 999
        # every operand of the arithmetic is stated in the question
        words = set(re.findall(r"\d+", problem.question))
        assert set(re.findall(r"\d+", problem.expression)) <= words, problem


def test_hand_checked_problems():
    """Solved by hand from the question text alone (catches wording that does not match the arithmetic)."""
    prompts = arithmetic_problems(8, seed=0)
    expected = {
        # Lena has 41 eggs, +36, -67, +36
        0: ("Lena has 41 eggs. Noah gives Lena 36 more eggs. Lena loses 67 eggs. Lena buys 36 more eggs.", "46"),
        # 4 tickets at 18 plus 3
        1: ("Sara buys 4 tickets at 18 dollars each and one box of crayons for 3 dollars.", "75"),
        # Chloe 22, Victor 22 + 6 = 28, together 50
        3: ("Chloe has 22 cookies. Victor has 6 more cookies than Chloe. How many cookies do Chloe and", "50"),
        # 240 pages - 67
        4: ("A book has 240 pages. Victor reads 67 pages on Wednesday. How many pages are left", "173"),
        # change from 200 after 3 * 23 + 26 = 95
        6: ("Hugo buys 3 notebooks at 23 dollars each and one toy car for 26 dollars. Hugo pays with a 200-", "105"),
        # 4 shells, times 4 = 16, +2, +39
        7: ("Diego has 4 shells. Then Diego ends up with 4 times as many shells as before. Diego buys 2", "57"),
    }
    for index, (start, answer) in expected.items():
        assert prompts[index].turns[0].startswith(start), prompts[index].turns[0]
        assert prompts[index].answer == answer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, r"count=0 is invalid"),
        ({"count": 5, "split": "validation"}, r"split='validation' is invalid.*\['train', 'test'\]"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        arithmetic_problems(**kwargs)


def test_read_synthetic_filters_categories_and_keeps_ids():
    everything = read_synthetic("synthetic:arithmetic:test", 60, seed=2)
    shopping = read_synthetic("synthetic:arithmetic:test", 5, seed=2, categories=["shopping"])
    assert len(shopping) == 5 and {p.category for p in shopping} == {"shopping"}
    by_id = {p.prompt_id: p for p in everything}
    assert all(by_id[p.prompt_id] == p for p in shopping if p.prompt_id in by_id)
    assert read_synthetic("synthetic:arithmetic", 3, seed=2)[0].prompt_id == "arith-s2-train-0"


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("synthetic:algebra", {}, r"unknown synthetic task 'algebra'.*\['synthetic:arithmetic', 'synthetic:chat'\]"),
        ("synthetic:arithmetic:dev", {}, r"split='dev' is invalid"),
        ("synthetic:arithmetic", {"categories": ["poetry"]}, r"unknown categories \['poetry'\].*'shopping'"),
    ],
)
def test_read_synthetic_errors_name_the_fix(spec, kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        read_synthetic(spec, 5, **kwargs)


# ---- synthetic:chat (instructions for EAGLE self-distillation)


def test_chat_instructions_are_deterministic_disjoint_and_not_mt_bench(mt_bench_path):
    import itertools
    import json

    from src.data.instructions import chat_prompts_stream
    from src.data.tasks import read_synthetic

    first = read_synthetic("synthetic:chat", 40, seed=0)
    assert [p.turns for p in first] == [p.turns for p in read_synthetic("synthetic:chat", 40, seed=0)]
    assert [p.category for p in first[:8]] == ["writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                               "stem", "humanities"]  # categories round-robin
    train = {p.turns[0] for p in itertools.islice(chat_prompts_stream(0, "train"), 600)}
    test = {p.turns[0] for p in itertools.islice(chat_prompts_stream(0, "test"), 600)}
    assert len(train) == 600 and not train & test
    evaluation = {json.loads(line)["turns"][0] for line in mt_bench_path.read_text().splitlines() if line.strip()}
    assert not train & evaluation
    assert [p.category for p in read_synthetic("synthetic:chat", 5, seed=0, categories=["coding"])] == ["coding"] * 5
    with pytest.raises(InvalidParameterError, match="split='dev'"):
        next(chat_prompts_stream(0, "dev"))
