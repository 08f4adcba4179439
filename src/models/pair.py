"""The target/draft pair every method runs on, loaded once and shared by all methods of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from src.models.loading import LoadedModel, load_model, load_tokenizer
from src.models.spec import ModelSpec
from src.models.tokenizer_guard import check_tokenizers


@dataclass
class ModelPair:
    """Plain holder (not an ``nn.Module``): Lightning never moves or casts these models, so device maps and
    quantized weights stay where their loader put them."""

    target: LoadedModel
    draft: LoadedModel | None = None

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        """Stop tokens: the tokenizer's EOS plus the generation config's (chat models often list several)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        config_eos = getattr(getattr(self.target.model, "generation_config", None), "eos_token_id", None)
        if isinstance(config_eos, int):
            ids.add(config_eos)
        elif config_eos:
            ids.update(int(i) for i in config_eos)
        return ids

    def describe(self) -> dict[str, Any]:
        return {"target": self.target.info, "draft": self.draft.info if self.draft else None}


def load_pair(target: ModelSpec, draft: ModelSpec | None) -> ModelPair:
    """Load the target, and the draft after checking its tokenizer (before its weights load); a draft named
    ``target`` is the target's own checkpoint (:meth:`ModelSpec.resolved_against`)."""
    target_tokenizer = load_tokenizer(target)
    draft = draft.resolved_against(target) if draft is not None else None
    draft_tokenizer = None
    if draft is not None:
        draft_tokenizer = load_tokenizer(draft)
        check_tokenizers(target_tokenizer, draft_tokenizer, target.describe(), draft.describe())
    loaded_target = load_model(target, tokenizer=target_tokenizer)
    loaded_draft = load_model(draft, tokenizer=draft_tokenizer) if draft is not None else None
    return ModelPair(target=loaded_target, draft=loaded_draft)
