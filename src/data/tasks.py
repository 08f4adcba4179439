"""Tasks with a checkable final answer: a built-in arithmetic word-problem generator.

AutoJudge labels a draft/target mismatch *important* when it changes the final answer, so it needs prompts
whose answer a program can check (the extractors that read it live in :mod:`src.data.answers`):
:func:`arithmetic_problems` draws seeded arithmetic word problems (answers in 0..999) so small models can be
evaluated with no download; ``synthetic:arithmetic[:train|test]`` reads them as a prompt source
(:func:`read_synthetic`). ``synthetic:chat[:train|test]`` is the chat-instruction stream of
:mod:`src.data.instructions` (no gold answer: for EAGLE self-distillation).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from src.data.instructions import CATEGORIES as CHAT_CATEGORIES
from src.data.instructions import chat_prompts_stream
from src.data.prompts import Prompt
from src.errors import InvalidParameterError

# ---- synthetic arithmetic word problems -------------------------------------------------------------------

SYNTHETIC_PREFIX = "synthetic:"
ARITHMETIC_DATASET = "synthetic_arithmetic"
ARITHMETIC_SPLITS = ("train", "test")
ANSWER_INSTRUCTION = 'Reason briefly, then finish with "The answer is <number>."'
MAX_ANSWER = 999
_MAX_MISSES = 10_000  # consecutive draws that are duplicates or of the other split before giving up

NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jack", "Kai", "Lena", "Mia",
    "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sara", "Tom", "Uma", "Victor", "Wen", "Yusuf", "Zoe",
)
OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "coins",
    "eggs", "flowers", "toy cars", "beads", "candies", "oranges", "crayons", "buttons",
)
ITEMS = (  # (singular, plural) for prices
    ("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
    ("toy car", "toy cars"), ("mug", "mugs"), ("puzzle", "puzzles"), ("plant", "plants"), ("ball", "balls"),
    ("kite", "kites"), ("hat", "hats"), ("box of crayons", "boxes of crayons"),
)
CONTAINERS = ("boxes", "bags", "baskets", "jars", "crates")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One word problem: the question (without the answer instruction), the arithmetic it encodes, the answer.

    ``expression`` uses only integers, ``+ - *`` and parentheses, so a test can evaluate it independently.
    """

    template: str
    question: str
    expression: str
    answer: int


def _two_names(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


def _inventory(rng: random.Random) -> ArithmeticProblem:
    """A person's collection changes in 1-3 steps (add, remove, at most one multiply)."""
    name, friend = _two_names(rng)
    things = rng.choice(OBJECTS)
    value = rng.randint(2, 60)
    sentences, expression = [f"{name} has {value} {things}."], str(value)
    multiplied = False
    for _ in range(rng.randint(1, 3)):
        step = rng.choice(("add", "sub", "mul") if not multiplied else ("add", "sub"))
        if step == "sub" and value < 2:
            step = "add"  # keep at least one thing, so the collection never runs out
        if step == "add":
            amount = rng.randint(1, 40)
            value, expression = value + amount, f"({expression} + {amount})"
            sentences.append(rng.choice((
                f"{name} buys {amount} more {things}.",
                f"{friend} gives {name} {amount} more {things}.",
                f"{name} finds {amount} more {things}.",
            )))
        elif step == "sub":
            amount = rng.randint(1, value - 1)
            value, expression = value - amount, f"({expression} - {amount})"
            sentences.append(rng.choice((
                f"{name} gives {amount} {things} to {friend}.",
                f"{name} loses {amount} {things}.",
                f"{name} sells {amount} {things}.",
            )))
        else:
            factor = rng.randint(2, 4)
            value, expression, multiplied = value * factor, f"({expression} * {factor})", True
            sentences.append(f"Then {name} ends up with {factor} times as many {things} as before.")
    sentences.append(f"How many {things} does {name} have now?")
    return ArithmeticProblem("inventory", " ".join(sentences), expression, value)


def _shopping(rng: random.Random) -> ArithmeticProblem:
    """Quantity times price, maybe one more item, maybe the change from a bill."""
    name = rng.choice(NAMES)
    (_, items), (extra, _) = rng.sample(ITEMS, 2)
    count, price = rng.randint(2, 9), rng.randint(1, 25)
    total, expression = count * price, f"{count} * {price}"
    purchase = f"{name} buys {count} {items} at {price} dollars each"
    if rng.random() < 0.5:
        extra_price = rng.randint(1, 30)
        total, expression = total + extra_price, f"{expression} + {extra_price}"
        purchase += f" and one {extra} for {extra_price} dollars"
    bills = [bill for bill in (20, 50, 100, 200, 500) if bill >= total]
    if bills and rng.random() < 0.5:
        bill = rng.choice(bills)
        question = f"{purchase}. {name} pays with a {bill}-dollar bill. How many dollars of change does {name} get?"
        return ArithmeticProblem("shopping", question, f"{bill} - ({expression})", bill - total)
    return ArithmeticProblem("shopping", f"{purchase}. How many dollars does {name} spend in total?", expression, total)


def _groups(rng: random.Random) -> ArithmeticProblem:
    """Equal groups (multiply), then maybe some taken out or added."""
    name = rng.choice(NAMES)
    things, containers = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    groups, size = rng.randint(2, 12), rng.randint(2, 15)
    total, expression = groups * size, f"{groups} * {size}"
    setup = f"There are {groups} {containers} with {size} {things} in each."
    roll = rng.random()
    if roll < 0.4:
        taken = rng.randint(1, total - 1)
        question = f"{setup} {name} takes out {taken} {things}. How many {things} are still in the {containers}?"
        return ArithmeticProblem("groups", question, f"{expression} - {taken}", total - taken)
    if roll < 0.7:
        added = rng.randint(1, 30)
        question = f"{setup} {name} adds {added} more {things}. How many {things} are there in all?"
        return ArithmeticProblem("groups", question, f"{expression} + {added}", total + added)
    return ArithmeticProblem("groups", f"{setup} How many {things} are there in all?", expression, total)


def _comparison(rng: random.Random) -> ArithmeticProblem:
    """A second person has more / fewer / a multiple; ask for theirs or the total."""
    name, friend = _two_names(rng)
    things = rng.choice(OBJECTS)
    mine = rng.randint(3, 80)
    kind = rng.choice(("more", "fewer", "times"))
    if kind == "more":
        delta = rng.randint(1, 40)
        theirs, their_expression = mine + delta, f"{mine} + {delta}"
        relation = f"{friend} has {delta} more {things} than {name}."
    elif kind == "fewer":
        delta = rng.randint(1, mine - 1)
        theirs, their_expression = mine - delta, f"{mine} - {delta}"
        relation = f"{friend} has {delta} fewer {things} than {name}."
    else:
        factor = rng.randint(2, 5)
        theirs, their_expression = mine * factor, f"{mine} * {factor}"
        relation = f"{friend} has {factor} times as many {things} as {name}."
    setup = f"{name} has {mine} {things}. {relation}"
    if rng.random() < 0.5:
        question = f"{setup} How many {things} does {friend} have?"
        return ArithmeticProblem("comparison", question, their_expression, theirs)
    question = f"{setup} How many {things} do {name} and {friend} have together?"
    return ArithmeticProblem("comparison", question, f"{mine} + ({their_expression})", mine + theirs)


def _reading(rng: random.Random) -> ArithmeticProblem:
    """Pages left after reading on one or two days, or the same amount for several days."""
    name = rng.choice(NAMES)
    pages = rng.randint(40, 400)
    if rng.random() < 0.4:
        per_day, days = rng.randint(2, 20), rng.randint(2, 7)
        read, read_expression = per_day * days, f"{per_day} * {days}"
        reading = f"{name} reads {per_day} pages every day for {days} days."
    else:
        first_day, first = rng.choice(WEEKDAYS[:-1]), rng.randint(1, pages // 2)
        read, read_expression = first, str(first)
        reading = f"{name} reads {first} pages on {first_day}"
        if rng.random() < 0.6:
            second_day = WEEKDAYS[WEEKDAYS.index(first_day) + 1]
            second = rng.randint(1, pages // 2)
            read, read_expression = first + second, f"{first} + {second}"
            reading += f" and {second} pages on {second_day}"
        reading += "."
    question = f"A book has {pages} pages. {reading} How many pages are left to read?"
    expression = f"{pages} - ({read_expression})" if " " in read_expression else f"{pages} - {read_expression}"
    return ArithmeticProblem("reading", question, expression, pages - read)


ARITHMETIC_TEMPLATES: dict[str, Callable[[random.Random], ArithmeticProblem]] = {
    "inventory": _inventory,
    "shopping": _shopping,
    "groups": _groups,
    "comparison": _comparison,
    "reading": _reading,
}


def draw_arithmetic_problem(rng: random.Random) -> ArithmeticProblem:
    """One problem from a random template, redrawn until its answer is in 0..999."""
    while True:
        problem = rng.choice(list(ARITHMETIC_TEMPLATES.values()))(rng)
        if 0 <= problem.answer <= MAX_ANSWER:
            return problem


def split_of(question: str) -> str:
    """``train`` or ``test`` by a stable hash of the text, so the splits never share a question, whatever the seed."""
    return ARITHMETIC_SPLITS[hashlib.sha256(question.encode("utf-8")).digest()[0] & 1]


def _check_split(split: str) -> None:
    if split not in ARITHMETIC_SPLITS:
        raise InvalidParameterError(
            f"split={split!r} is invalid for synthetic arithmetic: use one of {list(ARITHMETIC_SPLITS)}"
        )


def iter_arithmetic_problems(seed: int = 0, split: str = "train") -> Iterator[ArithmeticProblem]:
    """The endless, deterministic stream of distinct problems of ``split`` for ``seed``.

    A prefix of the stream does not depend on how much of it is read, so the N-th problem (and its prompt id)
    is the same for every ``count``.
    """
    _check_split(split)
    rng, seen, misses = random.Random(seed), set(), 0
    while True:
        problem = draw_arithmetic_problem(rng)
        if problem.question in seen or split_of(problem.question) != split:
            misses += 1
            if misses > _MAX_MISSES:
                raise InvalidParameterError(
                    f"synthetic arithmetic ran out of distinct {split} problems after {len(seen)}: ask for fewer"
                )
            continue
        seen.add(problem.question)
        misses = 0
        yield problem


def arithmetic_prompt(problem: ArithmeticProblem, index: int, seed: int, split: str) -> Prompt:
    """The problem as a prompt: question + answer instruction, GSM8K-style reference, gold ``answer``.

    The seed is part of the id: results are resumed by (dataset, prompt id), and another seed draws other
    questions.
    """
    return Prompt(
        prompt_id=f"arith-s{seed}-{split}-{index}",
        category=problem.template,
        turns=[f"{problem.question} {ANSWER_INSTRUCTION}"],
        dataset=ARITHMETIC_DATASET,
        reference=[f"{problem.expression} = {problem.answer}\n#### {problem.answer}"],
        answer=str(problem.answer),
    )


def arithmetic_prompts_stream(seed: int = 0, split: str = "train") -> Iterator[Prompt]:
    """:func:`iter_arithmetic_problems` as prompts, numbered in stream order (the ids survive filtering)."""
    for index, problem in enumerate(iter_arithmetic_problems(seed, split)):
        yield arithmetic_prompt(problem, index, seed, split)


def arithmetic_problems(count: int, seed: int = 0, split: str = "train") -> list[Prompt]:
    """``count`` distinct arithmetic word problems of ``split`` (``train`` or ``test``), deterministic in ``seed``."""
    if count < 1:
        raise InvalidParameterError(f"count={count} is invalid: ask for at least 1 synthetic problem")
    _check_split(split)
    stream = arithmetic_prompts_stream(seed, split)
    return [next(stream) for _ in range(count)]


SYNTHETIC_TASKS: dict[str, tuple[Callable[[int, str], Iterator[Prompt]], tuple[str, ...]]] = {
    "arithmetic": (arithmetic_prompts_stream, tuple(ARITHMETIC_TEMPLATES)),
    "chat": (chat_prompts_stream, tuple(CHAT_CATEGORIES)),  # instructions for self-distillation (no answer)
}


def read_synthetic(spec: str, count: int, seed: int = 0, categories: list[str] | None = None) -> list[Prompt]:
    """``synthetic:<task>[:<split>]``: the first ``count`` generated prompts (of ``categories``, if given).

    Filtering takes the first matching prompts of the unfiltered stream, so each keeps its id.
    """
    name, _, split = spec[len(SYNTHETIC_PREFIX):].partition(":")
    if name not in SYNTHETIC_TASKS:
        raise InvalidParameterError(
            f"unknown synthetic task {name!r} in {spec!r}: use one of {[SYNTHETIC_PREFIX + t for t in SYNTHETIC_TASKS]}"
        )
    if count < 1:
        raise InvalidParameterError(f"limit={count} is invalid for {spec}: use a positive number of prompts")
    stream, known = SYNTHETIC_TASKS[name]
    unknown = [c for c in categories or [] if c not in known]
    if unknown:
        raise InvalidParameterError(f"unknown categories {unknown} in {spec}: present are {sorted(known)}")
    prompts: list[Prompt] = []
    for prompt in stream(seed, split or "train"):
        if not categories or prompt.category in categories:
            prompts.append(prompt)
            if len(prompts) == count:
                return prompts
    return prompts
