"""Short help built from our own classes: ``predict --help`` / ``fit --help`` and ``python -m src methods``.

LightningCLI's own ``--help`` is ~540 lines of Trainer options and never shows a method's parameters (they are
``class_path`` entries of a list); it stays available as ``--help-all``. Everything here is read from the typed
``__init__`` signatures and their docstrings' ``Args:`` sections, so it cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

from src.decoding.base import DecodingMethod

METHOD_MODULES = ("src.decoding.baseline", "src.decoding.speculative", "src.decoding.specexec",
                  "src.decoding.autojudge")
DEFAULT_CLASSES = {
    "predict": ("src.lit.module.DecodingModule", "src.lit.data.PromptDataModule"),
    "fit": ("src.lit.judge.AutoJudgeModule", "src.lit.judge.JudgeDataModule"),
}
RUN_OPTIONS = {
    "predict": ("output", "resume", "resume_as_new_config", "experiment", "verbose", "require_headless"),
    "fit": ("verbose", "require_headless"),
}


def known_methods() -> dict[str, type[DecodingMethod]]:
    """``class_path -> class`` of every decoding method that ships, in the order a newcomer meets them."""
    found: dict[str, type[DecodingMethod]] = {}
    for module_name in METHOD_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, DecodingMethod) and obj.__module__ == module_name:
                found[f"{module_name}.{name}"] = obj
    return found


def import_class(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def docstring_args(cls: type) -> dict[str, str]:
    """``name -> description`` from the ``Args:`` section of ``cls``'s docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    args: dict[str, str] = {}
    current = None
    for line in (section.group(1) if section else "").splitlines():
        if match := re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line):
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current and line.strip():
            args[current] += " " + line.strip()
    return args


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return re.sub(r"\b(typing|src\.[\w.]+)\.", "", str(text))


def describe_parameters(cls: type, prefix: str) -> list[str]:
    """One entry per ``__init__`` parameter of ``cls``: ``--prefix.name TYPE (default X)`` and its description."""
    docs = docstring_args(cls)
    lines = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            default = ""
        elif dataclasses.is_dataclass(parameter.default):
            default = f" (default: {type(parameter.default).__name__}() with the fields below)"
        else:
            default = f" (default {parameter.default!r})"
        lines.append(f"  {prefix}{name}: {_type_name(parameter.annotation)}{default}")
        if docs.get(name):
            lines += textwrap.wrap(docs[name], width=100, initial_indent="      ", subsequent_indent="      ")
    return lines


def _first_line(cls: type) -> str:
    return (inspect.getdoc(cls) or "").split("\n", 1)[0]


def methods_text() -> str:
    """What ``python -m src methods`` prints: every method with its ``init_args``."""
    out = ["Decoding methods (in a config: model.init_args.methods: [{class_path: ..., init_args: {...}}])", ""]
    for path, cls in known_methods().items():
        draft = "needs model.draft" if cls.needs_draft else "target only"
        out += [f"{cls.name}: {path}  ({draft})", f"  {_first_line(cls)}"]
        out += describe_parameters(cls, "") or ["  (no parameters)"]
        out.append("")
    out.append("Example: --config configs/speculative.yaml, or add to a config:\n"
               "  methods:\n    - class_path: src.decoding.speculative.SpeculativeSampling\n"
               "      init_args: {k: 8}")
    return "\n".join(out)


def config_classes(subcommand: str, args: list[str]) -> tuple[str, str]:
    """The model and data classes the given ``--config`` files choose (the last one naming each wins)."""
    import yaml

    model, data = DEFAULT_CLASSES[subcommand]
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        if path is None or not Path(path).is_file():
            continue
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        model = (config.get("model") or {}).get("class_path", model)
        data = (config.get("data") or {}).get("class_path", data)
    return model, data


def subcommand_help(subcommand: str, args: list[str], parser_options: dict[str, str]) -> str:
    """The short ``--help`` of ``predict`` / ``fit``: run options, model, data, methods, where the rest is."""
    model_path, data_path = config_classes(subcommand, args)
    out = [
        f"usage: python -m src {subcommand} --config configs/<name>.yaml [--config more.yaml] [--key value ...]",
        "",
        "Run options:",
    ]
    out += [f"  --{name}: {parser_options.get(name, '')}" for name in RUN_OPTIONS[subcommand]]
    for title, prefix, path in (("Model", "--model.", model_path), ("Data", "--data.", data_path)):
        cls = import_class(path)
        out += ["", f"{title} ({path}): {_first_line(cls)}", *describe_parameters(cls, prefix)]
    out += [
        "",
        "Model specs (--model.target.* and --model.draft.*):",
        *describe_parameters(import_class("src.models.spec.ModelSpec"), "--model.target."),
        "",
        "Methods: `python -m src methods` lists every method and its parameters.",
        "Lists on the command line take brackets: --data.categories '[writing, coding]'.",
        f"Trainer, loggers and every other option: python -m src {subcommand} --help-all",
    ]
    return "\n".join(out)
