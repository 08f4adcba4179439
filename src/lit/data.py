"""Prompt DataModule: yields one prompt (all its turns) per predict step."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from src.data.prompts import (
    HUB_PREFIX,
    Prompt,
    PromptFormat,
    check_limit_order,
    read_hub_dataset,
    read_prompt_file,
    select_prompts,
)
from src.data.tasks import SYNTHETIC_PREFIX, read_synthetic
from src.errors import InvalidParameterError

SYNTHETIC_DEFAULT_COUNT = 100  # prompts generated for a synthetic task when ``limit`` is None


def _single_item(item):
    return item


class PromptDataModule(L.LightningDataModule):
    """Prompts from a JSONL file (MT-Bench / Spec-Bench, GSM8K, or any JSONL with a text field), a hub dataset,
    or a built-in generated task.

    Each predict batch is one prompt's dict: the :class:`~src.data.prompts.Prompt` fields (``answer`` is the gold
    final answer, or None) plus the decoding options below.

    Args:
        path: the JSONL file (``make setup`` provides ``datasets/mt_bench.jsonl``), ``hub:<name>[:<config>]``
            to read a hub dataset through the ``datasets`` library, or ``synthetic:arithmetic[:train|test]``
            for seeded arithmetic word problems with known answers (split ``train`` by default; no download), or
            ``synthetic:chat[:train|test]`` for generated chat instructions (EAGLE self-distillation).
        format: ``auto`` (detect per line), ``mt_bench``, ``gsm8k`` or ``jsonl``.
        text_field: the prompt field of ``jsonl`` rows.
        split: split of a hub dataset (a synthetic task takes its split from ``path``).
        categories: keep only these categories (default: all; a synthetic task's categories are its templates).
        limit: keep N prompts after filtering and shuffling (default: all); for a synthetic task, how many to
            generate (default 100).
        limit_order: how ``limit`` picks: ``round_robin`` (default) spreads the N prompts over the categories
            (the first of each category in order of first appearance, then the second of each, ...; they run
            in that order) so a small run samples every category; ``file`` keeps the first N in file order.
        turns: ``1`` decodes the first turn only; ``2`` also decodes MT-Bench's second turn, conditioned on the
            method's own first answer (as Spec-Bench does).
        chat_template: format prompts with the tokenizer's chat template.
        system_prompt: a system message placed before the first user turn (default: the template's own).
        max_prompt_tokens: keep only the last N prompt tokens (with a warning) when a prompt is longer.
        shuffle: shuffle the prompts (with ``seed``) before ``limit`` applies (``round_robin`` follows the
            shuffled order).
        seed: the shuffle seed, and the generation seed of a synthetic task.
    """

    def __init__(
        self,
        path: str = "datasets/mt_bench.jsonl",
        format: PromptFormat = "auto",
        text_field: str = "prompt",
        split: str = "test",
        categories: list[str] | None = None,
        limit: int | None = None,
        limit_order: str = "round_robin",
        turns: Literal[1, 2] = 1,
        chat_template: bool = True,
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if turns not in (1, 2):
            raise InvalidParameterError(f"turns={turns} is invalid: use 1 (first turn) or 2 (both MT-Bench turns)")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise InvalidParameterError(f"max_prompt_tokens={max_prompt_tokens} is invalid: use a positive count")
        check_limit_order(limit_order)
        self.path = path
        self.format = format
        self.text_field = text_field
        self.split = split
        self.categories = categories
        self.limit = limit
        self.limit_order = limit_order
        self.turns = turns
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.prompts: list[Prompt] = []

    def load_prompts(self) -> list[Prompt]:
        """Read and filter the prompts (cheap; the CLI calls it before any model loads to fail fast)."""
        if not self.prompts:
            if self.path.startswith(SYNTHETIC_PREFIX):
                count = SYNTHETIC_DEFAULT_COUNT if self.limit is None else self.limit
                rows = read_synthetic(self.path, count, self.seed, self.categories)
            elif self.path.startswith(HUB_PREFIX):
                rows = read_hub_dataset(self.path, self.split, self.format, self.text_field)
            else:
                rows = read_prompt_file(self.path, self.format, self.text_field)
            self.prompts = select_prompts(rows, self.categories, self.limit, self.path, self.shuffle, self.seed,
                                          self.limit_order)
        return self.prompts

    def setup(self, stage: str) -> None:
        self.load_prompts()

    def prompt_options(self) -> dict[str, Any]:
        """How every prompt is formatted for the model (part of each record's run fingerprint)."""
        return {
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_prompt_tokens": self.max_prompt_tokens,
        }

    def input_files(self) -> list[str]:
        """The prompt file (none for hub datasets and generated tasks): results must never be written over it."""
        return [] if self.path.startswith((SYNTHETIC_PREFIX, HUB_PREFIX)) else [self.path]

    def predict_dataloader(self) -> DataLoader:
        options = {"num_turns": self.turns, **self.prompt_options()}
        items = [{**asdict(p), **options} for p in self.load_prompts()]
        return DataLoader(items, batch_size=None, shuffle=False, collate_fn=_single_item)
