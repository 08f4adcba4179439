"""Refuse draft/target pairs whose tokenizers differ: speculative methods compare token ids directly."""

from __future__ import annotations

from src.errors import IncompatibleModelsError

PROBE_TEXT = "Speculative decoding: 12 tokens/s, naïve café — ½ × π ≈ 1.57!\n\tdef f(x): return x**2  # 你好"


class TokenizerMismatchError(IncompatibleModelsError):
    """Draft and target tokenizers differ (vocabulary, special tokens or encoding)."""


def _special_tokens(tokenizer) -> dict[str, tuple[str | None, int | None]]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: (getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)) for name in names}


def tokenizer_differences(target_tokenizer, draft_tokenizer) -> list[str]:
    """What differs between two tokenizers (empty when compatible)."""
    problems = []
    if len(target_tokenizer) != len(draft_tokenizer):
        problems.append(f"vocabulary size {len(target_tokenizer)} vs {len(draft_tokenizer)}")
    else:
        target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        moved = [token for token, index in target_vocab.items() if draft_vocab.get(token) != index]
        if moved:
            example = moved[0]
            problems.append(
                f"{len(moved)} tokens map to other ids (e.g. {example!r}: {target_vocab[example]} vs "
                f"{draft_vocab.get(example)})"
            )
    target_special, draft_special = _special_tokens(target_tokenizer), _special_tokens(draft_tokenizer)
    for name in target_special:
        if target_special[name] != draft_special[name] and name != "pad_token":
            problems.append(f"{name} {target_special[name]} vs {draft_special[name]}")
    target_ids = target_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    draft_ids = draft_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if target_ids != draft_ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(target_ids, draft_ids)) if a != b), min(len(target_ids), len(draft_ids))
        )
        problems.append(
            f"probe text encodes differently from token {first} "
            f"({target_ids[first:first + 4]} vs {draft_ids[first:first + 4]})"
        )
    return problems


def check_tokenizers(target_tokenizer, draft_tokenizer, target_name: str, draft_name: str) -> None:
    problems = tokenizer_differences(target_tokenizer, draft_tokenizer)
    if problems:
        raise TokenizerMismatchError(
            f"draft tokenizer of {draft_name!r} is incompatible with target tokenizer of {target_name!r}: "
            + "; ".join(problems)
            + ". Use a draft from the same model family (same tokenizer)."
        )
