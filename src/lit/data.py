"""Prompt DataModule: yields one prompt per predict step."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
from torch.utils.data import DataLoader

from src.data.prompts import Prompt, read_prompt_file, select_prompts


def _single_item(item):
    return item


class PromptDataModule(L.LightningDataModule):
    """Prompts from a MT-Bench / Spec-Bench format JSONL file.

    Args:
        path: the JSONL file (``make setup`` provides ``datasets/mt_bench.jsonl``).
        categories: keep only these categories (default: all).
        limit: keep the first N prompts after filtering (default: all).
        chat_template: format prompts with the tokenizer's chat template.
        system_prompt: a system message placed before the user turn (default: the template's own).
    """

    def __init__(
        self,
        path: str = "datasets/mt_bench.jsonl",
        categories: list[str] | None = None,
        limit: int | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.path = path
        self.categories = categories
        self.limit = limit
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.prompts: list[Prompt] = []

    def load_prompts(self) -> list[Prompt]:
        """Read and filter the prompts (cheap; the CLI calls it before any model loads to fail fast)."""
        if not self.prompts:
            self.prompts = select_prompts(read_prompt_file(self.path), self.categories, self.limit, self.path)
        return self.prompts

    def setup(self, stage: str) -> None:
        self.load_prompts()

    def predict_dataloader(self) -> DataLoader:
        items = [
            {**asdict(p), "chat_template": self.chat_template, "system_prompt": self.system_prompt}
            for p in self.load_prompts()
        ]
        return DataLoader(items, batch_size=None, shuffle=False, collate_fn=_single_item)
