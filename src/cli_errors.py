"""Turn what goes wrong on the command line into one line that names the problem and the fix.

Three kinds of failure reach ``python -m src``:

- our own :class:`~src.errors.UserInputError`, often wrapped by jsonargparse (it instantiates the classes of the
  config and re-raises their errors inside a ``ValueError``/``TypeError`` listing every union subtype it tried);
- jsonargparse's ``ArgumentError`` for a value it cannot parse (a string where a list is expected, an unknown
  option, an unknown ``class_path``): a nested report of 10-70 lines whose one useful line is the deepest;
- Lightning's ``MisconfigurationException`` for a bad ``--trainer.*`` value.

:func:`one_line_error` finds the useful part; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from src.errors import UserInputError

# Lines of jsonargparse's union report that say nothing about the user's mistake.
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|"
    r"Expected a <class 'NoneType'>|Given value type: .*|Given value: .*)$"
)
_PARSER_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":$')
_CLASS_PATH = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':$")
# What jsonargparse names as the owner of an option when the config gives no ``class_path``.
_BASE_CLASSES = {
    "lightning.LightningModule": "model", "lightning.pytorch.LightningModule": "model",
    "lightning.LightningDataModule": "data", "lightning.pytorch.LightningDataModule": "data",
}
_LIST_EXPECTED = "Expected a <class 'list'>"
_BAD_IMPORT = ("has no attribute", "No module named", "Expected a dot import path string",
               "does not correspond to a subclass", "Import path", "is not a subclass")


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it was raised from or while handling, each once."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__context__, current.__cause__]


def one_line_error(error: BaseException) -> str | None:
    """The one line to print for a user's mistake (without the ``error:`` prefix), or None for a bug."""
    for link in exception_chain(error):
        if isinstance(link, UserInputError):
            return str(link)
    for link in exception_chain(error):
        if isinstance(link, argparse.ArgumentError) or type(link).__name__ == "ArgumentError":
            return explain_parse_error(str(link))
    for link in exception_chain(error):
        if type(link).__name__ == "MisconfigurationException":
            return f"{link} (a --trainer.* value: `python -m src predict --help-all` lists them)"
    return None


def _deepest_problem(message: str) -> tuple[list[str], str | None, list[str]]:
    """(option path, class_path being read there, the problem's lines) at the deepest level of the report."""
    stack: list[tuple[int, str, str]] = []  # (indent, kind, value)
    best: tuple[int, list[tuple[int, str, str]], list[str]] = (-1, [], [])
    lines = message.splitlines()
    for index, raw in enumerate(lines):
        indent, line = len(raw) - len(raw.lstrip()), raw.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := _PARSER_KEY.match(line):
            stack.append((indent, "key", match.group(1)))
        elif match := _CLASS_PATH.match(line):
            stack.append((indent, "class", match.group(1)))
        elif line and not _NOISE.match(line) and len(stack) > best[0]:
            # the problem line, plus the "Given value" lines at the same level (they name the bad value)
            siblings = [s.strip() for s in lines[index + 1:] if s.strip().startswith("Given value:")]
            best = (len(stack), list(stack), [line.removeprefix("- "), *siblings[:1]])
    _, frames, problem = best
    keys = [value for _, kind, value in frames if kind == "key"]
    classes = [value for _, kind, value in frames if kind == "class"]
    return keys, (classes[-1] if classes else None), problem


def explain_parse_error(message: str) -> str:
    """One line for a jsonargparse parse failure, with the fix for the common mistakes."""
    keys, class_path, problem = _deepest_problem(message)
    option = "--" + ".".join(keys) if keys else "an option"
    text = problem[0] if problem else message.strip().splitlines()[-1]
    given = problem[1].removeprefix("Given value:").strip() if len(problem) > 1 else None
    if text == _LIST_EXPECTED:
        value = given or "..."
        return (f"{option} expects a list, got {value!r}: write {option} '[{value}]' on the command line "
                f"(YAML: {keys[-1] if keys else 'key'}: [{value}])")
    if any(marker in text for marker in _BAD_IMPORT):
        dotted = re.match(r"Expected a dot import path string: (.*)$", text)
        bad = dotted.group(1) if dotted else class_path or text.rsplit(":", 1)[-1].strip()
        if "methods" in keys:
            from src.cli_help import known_methods  # imports the decoding methods (torch): only on this error

            names = ", ".join(f"{cls.name} ({path})" for path, cls in known_methods().items())
            return (f"unknown method class_path {bad!r} in {option}: use one of {names}; "
                    "`python -m src methods` lists their parameters")
        return f"unknown class_path {bad!r} for {option}: give the full import path of the class ({text})"
    if match := re.match(r"Option '([^']+)' is not accepted", text):
        full = ".".join([*keys, match.group(1)])
        if class_path in _BASE_CLASSES:
            # Only a config naming the class gives options to take: a model preset (configs/models/*.yaml)
            # sets the models of a full config and has none.
            what = _BASE_CLASSES[class_path]
            return (f"--{full} is set but no config names the {what} class_path (a model preset such as "
                    f"configs/models/*.yaml only completes a full config): put a full config first, e.g. "
                    f"--config configs/specexec.yaml --config <the preset>")
        owner = f" of {class_path}" if class_path else ""
        return f"--{full} is not an option{owner}: `python -m src predict --help` lists the options"
    if match := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", text):
        return f"{option}={match.group(2)} is invalid: use one of {match.group(1)}"
    text = re.sub(r"<class '([^']+)'>", r"\1", text)
    return f"{option}: {text}" if keys else text
