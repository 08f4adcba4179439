"""Chat instructions for self-distillation: the ``synthetic:chat`` prompt source.

Why: a draft head learns the text it will draft. Trained on math and short factual answers only, the EAGLE head
agreed with the target on MT-Bench's chat answers far less than on its validation set. Chat datasets (ShareGPT,
UltraChat) are on the hub, which this project cannot reach at run time, and MT-Bench itself is the evaluation
set. So this module composes instructions of MT-Bench's *kinds* (writing, roleplay, reasoning, math, coding,
extraction, STEM, humanities) from templates and topics written for it; the target answers them itself
(``self_distill_path: synthetic:chat``), and ``overlap_warning`` checks that none equals an evaluation prompt.
The stream is deterministic for a seed, categories interleaved; ``train`` and ``test`` splits never share a
prompt. To look at them, or to hand them to another tool as MT-Bench-format JSONL:

    python -m src.data.instructions --out chat_instructions.jsonl --count 800
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from src.data.prompts import Prompt
from src.errors import InvalidParameterError

CHAT_DATASET = "synthetic_chat"
CHAT_SPLITS = ("train", "test")

TOPICS = [
    "remote work", "urban gardening", "electric cars", "a small bakery", "learning a second language",
    "the history of tea", "sleep and memory", "public libraries", "a mountain hiking trip", "recycling plastics",
    "a local farmers market", "video game design", "volunteering at an animal shelter", "solar panels at home",
    "the first day at a new job", "a family reunion", "minimalist living", "jazz music", "coral reefs",
    "a community theater", "budget travel in Europe", "healthy breakfast habits", "online privacy",
    "a science fair project", "the invention of the printing press", "winter cycling", "a rainy weekend",
    "starting a podcast", "bees and pollination", "a lost wallet returned by a stranger", "space tourism",
    "board games with friends", "a vintage bookstore", "climate-friendly diets", "learning to play the guitar",
    "a coffee shop opening", "time management for students", "the Roman aqueducts", "a camping trip gone wrong",
    "smartphone addiction", "a neighborhood cleanup day", "the ocean at night", "baking sourdough bread",
    "a marathon training plan", "artificial intelligence in schools", "an old lighthouse", "city parks",
]

AUDIENCES = ["a ten-year-old", "a busy parent", "a retired engineer", "a first-year university student",
             "a small-business owner", "a skeptical friend", "a new employee", "a tourist"]

PERSONS = ["a pirate captain", "a medieval knight", "a friendly robot", "a famous detective", "a tour guide in Rome",
           "a grumpy chef", "a wise old wizard", "a sports commentator", "a nervous astronaut",
           "a 1920s newspaper reporter", "a kind librarian", "a startup founder", "a personal fitness coach"]

WRITING = [
    "Write a short blog post about {topic}.",
    "Compose a persuasive paragraph arguing for more attention to {topic}.",
    "Write a four-line poem about {topic}.",
    "Draft a friendly email to a colleague inviting them to a talk on {topic}.",
    "Write a product description for a new gadget related to {topic}.",
    "Write a short story of about 150 words that involves {topic}.",
    "Give me five catchy titles for an article about {topic}.",
    "Write a short speech for a school assembly about {topic}.",
    "Explain {topic} to {audience} in a few short paragraphs.",
    "Write a diary entry from someone experiencing {topic} for the first time.",
    "Summarize the pros and cons of {topic} in a short paragraph.",
    "Write a social media post announcing an event about {topic}.",
]

ROLEPLAY = [
    "Pretend you are {person}. Describe your typical morning.",
    "You are {person}. Give advice to someone interested in {topic}.",
    "Act as {person} and explain what you think about {topic}.",
    "Imagine you are {person} writing a letter to a friend about {topic}.",
    "As {person}, introduce yourself to a new group of people.",
    "Role-play as {person} who has just discovered {topic}. What do you say?",
]

REASONING = [
    "If {a} people each shake hands with every other person exactly once, how many handshakes happen? Explain.",
    "A train leaves at {h}:00 and travels for {b} hours and {m} minutes. At what time does it arrive?",
    "Tom is older than Anna, and Anna is older than {name}. Who is the youngest? Explain your reasoning.",
    "There are {a} red balls and {b} blue balls in a bag. What is the chance of drawing a blue ball?",
    "If today is {day}, what day of the week will it be in {c} days? Explain step by step.",
    "A farmer has {a} chickens and {b} cows. How many legs are there in total?",
    "Which is heavier: {a} kilograms of feathers or {b} kilograms of iron? Explain.",
    "Five friends sit in a row. {name} sits at one end and nobody sits between {name} and Lee. Where can Lee sit?",
]

MATH = [
    "Solve for x: {a}x + {b} = {c}.",
    "What is the area of a rectangle with sides {a} cm and {b} cm? Show the steps.",
    "Find the sum of all integers from 1 to {c}.",
    "A shirt costs ${c} and is discounted by {p}%. What is the new price?",
    "What is the greatest common divisor of {a} and {c}? Explain the method.",
    "A circle has a radius of {a} meters. What are its area and circumference?",
    "If a car travels {c} kilometers in {b} hours, what is its average speed?",
    "Compute {a} squared plus {b} squared, then take the square root. Is the result an integer?",
]

LANGUAGES = ["Python", "JavaScript", "Java", "C++", "Go", "Rust", "TypeScript"]
CODE_TASKS = ["reverses a linked list", "checks whether a number is prime", "finds the most common element of a list",
              "converts Celsius to Fahrenheit", "validates an email address", "computes the factorial of n",
              "flattens a nested list", "counts the vowels in a string", "sorts a list of names by length",
              "returns the second largest number in an array", "checks whether two strings are anagrams",
              "computes a running average", "parses a date string", "removes whitespace from a string",
              "implements binary search"]

CODING = [
    "Write a {lang} function that {code_task}.",
    "Explain, step by step, how you would write a {lang} function that {code_task}.",
    "Review this plan and write the code: a {lang} function that {code_task}, with a short test.",
    "Write a Python function that returns the {n}th Fibonacci number.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that counts how often each word appears in a text.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a SQL query that selects the {n} most recent orders from a table named orders.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Explain what a hash table is and when you would use one.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a bash command that counts the lines of every .txt file in a folder.",
    "Write a Python function that returns the largest {n} numbers of a list.",
    "Explain recursion to {audience}, with a short code example.",
]

EXTRACTION = [
    "Extract the names and dates from this text: '{name} met {name2} on {day}, and they met again {c} days later "
    "to discuss {topic}.'",
    "Read this review and say whether it is positive or negative: 'I tried a workshop on {topic}. It was {adj}, "
    "and I would {verdict} recommend it.'",
    "List the key points of this note as bullet points: 'Meeting on {day}. Topic: {topic}. Budget: ${c}. "
    "Owner: {name}. Deadline in {b} weeks.'",
    "Return a JSON object with the fields name, topic and day from: '{name} will present {topic} on {day}.'",
    "Summarize in one sentence: '{name} spent {b} weeks studying {topic} and found that it was {adj}.'",
]

STEM = [
    "Explain how {science} works in simple terms.",
    "What are the main causes and effects of {science}?",
    "Describe an experiment a student could do at home to learn about {science}.",
    "Why is {science} important for everyday life? Give three examples.",
    "Explain {science} to {audience}.",
]

SCIENCE = ["photosynthesis", "the water cycle", "vaccines", "electric circuits", "plate tectonics", "gravity",
           "the greenhouse effect", "DNA replication", "sound waves", "magnetism", "the immune system",
           "nuclear fusion in stars", "ocean tides", "antibiotic resistance", "the internet's routing"]

HUMANITIES = [
    "What were the main causes of {history}? Answer in a few paragraphs.",
    "How did {history} change everyday life for ordinary people?",
    "Compare {history} with a similar event from another country.",
    "What lessons can leaders today learn from {history}?",
    "Describe the role of art and culture during {history}.",
    "Discuss the economic effects of {topic} on a small town.",
    "What ethical questions does {topic} raise?",
]

HISTORY = ["the Industrial Revolution", "the Renaissance", "the fall of the Roman Empire", "the Silk Road trade",
           "the invention of the telephone", "the French Revolution", "the space race", "the printing press",
           "the Meiji Restoration", "the abolition of slavery", "the spread of railways"]

NAMES = ["Maria", "Kenji", "Amara", "Lucas", "Priya", "Omar", "Sofia", "Jonas", "Mei", "Diego"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

CATEGORIES = {
    "writing": WRITING, "roleplay": ROLEPLAY, "reasoning": REASONING, "math": MATH, "coding": CODING,
    "extraction": EXTRACTION, "stem": STEM, "humanities": HUMANITIES,
}


def _fill(template: str, rng: random.Random) -> str:
    name, name2 = rng.sample(NAMES, 2)
    slots = {
        "topic": rng.choice(TOPICS), "audience": rng.choice(AUDIENCES), "person": rng.choice(PERSONS),
        "lang": rng.choice(LANGUAGES), "code_task": rng.choice(CODE_TASKS), "science": rng.choice(SCIENCE), "history": rng.choice(HISTORY), "name": name, "name2": name2,
        "day": rng.choice(DAYS), "a": rng.randint(3, 19), "b": rng.randint(2, 9), "c": rng.randint(20, 240),
        "h": rng.randint(5, 20), "m": rng.choice([10, 15, 20, 30, 45]), "n": rng.randint(3, 12),
        "p": rng.choice([10, 15, 20, 25, 30, 40]), "adj": rng.choice(["inspiring", "too long", "well organized",
                                                                      "confusing", "fun"]),
        "verdict": rng.choice(["definitely", "not", "probably"]),
    }
    return template.format(**slots)


def _split_of(text: str) -> str:
    return CHAT_SPLITS[hashlib.sha256(text.encode("utf-8")).digest()[0] & 1]


def chat_prompts_stream(seed: int = 0, split: str = "train") -> Iterator[Prompt]:
    """Distinct instructions of ``split``, categories round-robin, deterministic for ``seed``; a category drops
    out when its templates give no new prompt in many draws, and the stream ends when every one has."""
    if split not in CHAT_SPLITS:
        raise InvalidParameterError(f"split={split!r} is invalid for synthetic:chat: use one of {list(CHAT_SPLITS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    index = 0
    active = list(CATEGORIES)  # a category whose templates give nothing new in many draws drops out
    while active:
        for category in list(active):
            for _ in range(2_000):
                prompt = _fill(rng.choice(CATEGORIES[category]), rng)
                if prompt not in seen and _split_of(prompt) == split:
                    break
            else:
                active.remove(category)
                continue
            seen.add(prompt)
            yield Prompt(prompt_id=f"chat-s{seed}-{split}-{index}", category=category, turns=[prompt],
                         dataset=CHAT_DATASET)
            index += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="chat_instructions.jsonl")
    parser.add_argument("--count", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=CHAT_SPLITS)
    args = parser.parse_args(argv)
    stream = chat_prompts_stream(args.seed, args.split)
    rows = [{"question_id": p.prompt_id, "category": p.category, "turns": p.turns}
            for p in itertools.islice(stream, args.count)]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} instructions to {path}")


if __name__ == "__main__":
    main()
