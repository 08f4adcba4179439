"""Answer extraction: pull the final number out of a generation and compare it with a gold answer.

- extractors (:data:`ANSWER_EXTRACTORS`, :func:`extract_answer`) pull the final number out of a generation;
- :func:`answers_match` compares it with a prompt's gold ``answer`` after :func:`normalize_number`.

Pure Python with no import of :mod:`src.data.prompts` or :mod:`src.data.tasks`: both use it, so neither
has to import the other to reach the extractors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from src.errors import InvalidParameterError

# An optional minus (not a hyphen inside a word or after a digit, so "5-3" reads as 5 and 3), an optional
# dollar sign on either side of it, digits with well-formed thousands commas ("1,000", not "1,2"), decimals.
_NUMBER = re.compile(r"(?:(?<![\w)])-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)


def _canonical(number: str) -> str | None:
    """``-$1,000.50`` -> ``-1000.5``: integers without a fraction, decimals without trailing zeros."""
    try:
        value = Decimal(number.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_number(text: str | None) -> str | None:
    """The canonical form of a number written alone (``"$1,000."`` -> ``"1000"``, ``"3.50"`` -> ``"3.5"``).

    None when ``text`` is not exactly one number (surrounding spaces and one trailing period allowed), so a
    gold answer that is not numeric is never compared as one.
    """
    if text is None:
        return None
    stripped = text.strip()
    if stripped.endswith("."):
        stripped = stripped[:-1].rstrip()
    match = _NUMBER.fullmatch(stripped)
    return _canonical(match.group()) if match else None


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _canonical(match.group()) if match else None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (normalized); None when there is none."""
    matches = _NUMBER.findall(text)
    return _canonical(matches[-1]) if matches else None


def gsm8k_answer(text: str) -> str | None:
    """GSM8K style: the number after the last ``####``, else after the last "answer is" / "answer:", else
    the last number (small models rarely keep the requested format, and the last number is usually the result).
    """
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        found = _first_number(text[phrases[-1].end():])
        if found is not None:
            return found
    return last_number(text)


ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": gsm8k_answer,
    "last_number": last_number,
}


def extract_answer(text: str, kind: str = "gsm8k") -> str | None:
    """The final answer of a generation by the extractor ``kind`` (a key of :data:`ANSWER_EXTRACTORS`)."""
    extractor = ANSWER_EXTRACTORS.get(kind)
    if extractor is None:
        raise InvalidParameterError(f"unknown answer extractor {kind!r}: use one of {sorted(ANSWER_EXTRACTORS)}")
    return extractor(text)


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Numeric equality after normalization (``"1,000"`` matches ``"1000.0"``); a missing side never matches."""
    left, right = normalize_number(predicted), normalize_number(gold)
    return left is not None and right is not None and Decimal(left) == Decimal(right)
