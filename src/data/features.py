"""Training data for an EAGLE-style draft head: the target's own features, mined resumably.

An EAGLE draft head (Li et al. 2024) learns from the target's *features*: its last hidden state after the
final norm (the lm_head input), one vector per token position, together with the token ids. A training pair at
position t reads (f_t, x_{t+1}) and predicts f_{t+1} and the target's distribution over x_{t+2},
softmax(lm_head(f_{t+1})), which training computes from the stored features (no logits are stored).

Pipeline:

1. conversations: :func:`read_conversations` (GSM8K, MT-Bench/Spec-Bench with ``reference``, or
   ``{"messages": [...]}`` JSONL) or self-distillation, :func:`generate_answers` over :func:`read_questions`;
2. :func:`build_features` teacher-forces the target over each whole conversation (chat template, no generation
   prompt) and appends the features to a :class:`FeatureStore`;
3. :class:`FeatureDataset` and :func:`collate_sequences` read them back for training;
4. :func:`overlap_warning` flags training prompts that are also evaluation prompts.

Steps 1 and 2 run for minutes on a real target: each shows a bar on stderr (:mod:`src.data.progress`).

Store layout (``root``)::

    meta.json                  target identity, feature_dtype, max_length, sources, chat template hash
    answers.jsonl              self-distilled answers, one row per prompt (with the generation settings)
    shards/000000.safetensors  one per batch of B items, N tokens in all:
                                 input_ids (N,) int32, features (N, H) in the store dtype,
                                 loss_mask (N,) uint8, offsets (B + 1,) int64 (item i: offsets[i]:offsets[i+1]),
                                 aux_features (N, 3H): only in an EAGLE-3 store (meta ``aux_layers``), the
                                 inputs of those target layers, side by side
    items.jsonl                one row per finished item: item_id, shard, index (in offsets), tokens,
                               answer_tokens, truncated

Resume rule: an item is finished when, and only when, ``items.jsonl`` has its row. A batch's shard is written
(to a temporary file, then renamed) before the rows of its items, so a row never names a missing shard; a
shard without rows (a run killed in between) is ignored, and the next batch overwrites it (shards are numbered
after the highest one a row names). Running :func:`build_features` again on the same store mines only the
items without a row; ``answers.jsonl`` does the same for :func:`generate_answers`. A store made with other
settings (``meta.json``) is refused; a store with ``aux_layers`` (EAGLE-3) also serves an EAGLE-1/2 fit that
asks for none (it reads ``features`` only), so both recipes train on the same data.

``loss_mask[t] = 1`` when token t and token t + 1 both lie in the answer region: the last (assistant)
message's tokens, from its first token through the end-of-turn (EOS) token the chat template puts after it
(what the target generates), cut at ``max_length``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from src.data.progress import QUICK_PHASE_DELAY_S, phase_progress
from src.decoding.base import input_device, layer_features
from src.errors import IncompatibleModelsError, InvalidParameterError, MalformedInputError, MissingInputError
from src.jsonl import append_rows, guard_meta, read_meta, read_rows, repair_lines

log = logging.getLogger(__name__)

FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "48/2 = <<48/2=24>>24"
_ROLES = ("system", "user", "assistant")
_FORMATS_HINT = ('expected GSM8K {"question", "answer"}, MT-Bench/Spec-Bench {"question_id", "turns", '
                 '"reference"} or {"messages": [{"role", "content"}, ...]}')


# ---------------------------------------------------------------- conversations


class Conversation(NamedTuple):
    """A training conversation; a tuple, so ``item_id, messages = conversation`` works."""

    item_id: str
    messages: list[dict[str, str]]  # [{"role", "content"}, ...]; the last one is the assistant's answer


class ConversationList(list):
    """The conversations read from one source (a plain list), with ``skipped``: lines without an answer."""

    def __init__(self, items: Iterable[Conversation] = (), skipped: int = 0, source: str = "") -> None:
        super().__init__(items)
        self.skipped = skipped
        self.source = source


def strip_calculator(text: str) -> str:
    """``48/2 = <<48/2=24>>24`` -> ``48/2 = 24`` (the ``#### 72`` line stays)."""
    return _CALCULATOR.sub("", text)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"each message needs a role in {list(_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError("each message needs a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _parse_line(row: Any, line_number: int) -> tuple[str, list[dict[str, str]], str | None]:
    """(id within the file, the messages before the answer, the answer or None) of one JSONL row."""
    if not isinstance(row, dict):
        raise TypeError(f"a line must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"])
        item = str(row.get("id", line_number))
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            return item, messages[:-1], messages[-1]["content"].strip() or None
        return item, messages, None
    if "turns" in row:
        turns = [row["turns"]] if isinstance(row["turns"], str) else row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError("'turns' must be a non-empty list of strings")
        reference = row.get("reference") or []
        answer = reference[0] if isinstance(reference, list) and reference and isinstance(reference[0], str) else ""
        return str(row.get("question_id", row.get("id", line_number))), [_user(turns[0])], answer.strip() or None
    if "question" in row:
        answer = strip_calculator(str(row.get("answer") or "")).strip()
        return str(row.get("id", line_number)), [_user(str(row["question"]))], answer or None
    raise KeyError("'messages', 'turns' or 'question'")


def _read_rows(path: str | Path) -> Iterator[tuple[str, list[dict[str, str]], str | None]]:
    """(item id ``<file stem>:<id>``, prompt messages, answer or None) per line; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"conversation file {path} does not exist: pass an existing JSONL file "
                                "(GSM8K, MT-Bench/Spec-Bench or {\"messages\": [...]})")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item, prompt, answer = _parse_line(json.loads(line), line_number)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                detail = f"missing field {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
                detail = detail.replace("\n", " ")
                raise MalformedInputError(f"{path}:{line_number}: malformed line ({detail}); {_FORMATS_HINT}") from error
            yield f"{path.stem}:{item}", prompt, answer


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InvalidParameterError(f"limit={limit} is invalid: use a positive number of items, or None for all")


def read_conversations(path: str | Path, limit: int | None = None) -> ConversationList:
    """Conversations with an answer from a JSONL file (GSM8K, MT-Bench/Spec-Bench turn 1 + reference 1, or
    ``{"messages": [...]}`` ending with the assistant); lines without an answer are skipped and counted."""
    _check_limit(limit)
    result = ConversationList(source=str(path))
    for item_id, prompt, answer in _read_rows(path):
        if limit is not None and len(result) >= limit:
            break
        if answer is None:
            result.skipped += 1
            continue
        result.append(Conversation(item_id, prompt + [{"role": "assistant", "content": answer}]))
    if result.skipped:
        log.info("%s: skipped %d lines without an answer", path, result.skipped)
    return result


def read_questions(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(item id, user text) of every line, answered or not: the prompts for :func:`generate_answers`."""
    _check_limit(limit)
    questions = []
    for item_id, prompt, _ in _read_rows(path):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if users:
            questions.append((item_id, users[-1]))
        if limit is not None and len(questions) >= limit:
            break
    return questions


# ---------------------------------------------------------------- tokenizer helpers


def _chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError("the tokenizer has no chat template: features must follow the target's chat "
                                    "format, so use a chat/instruct target (or set tokenizer.chat_template)")
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    ids = encoded["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def eos_token_ids(target, tokenizer) -> set[int]:
    """The tokenizer's EOS plus the target's generation-config EOS ids (chat models often list several)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return ids


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (B, T) and attention mask (B, T), padding on the left or the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def _unique_ids(ids: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for item_id in ids:
        if item_id in seen:
            raise InvalidParameterError(f"item id {item_id!r} appears twice among the {what}: give every item "
                                        "its own id (ids are '<file stem>:<id or line>')")
        seen.add(item_id)


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16)


# ---------------------------------------------------------------- self-distillation


def generate_answers(
    target,
    tokenizer,
    prompts: list[tuple[str, str]],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
    store: FeatureStore | None = None,
    show_progress: bool = True,
) -> list[Conversation]:
    """The target's own answers to ``prompts`` (item id, user text), as conversations in the same order.

    Batched HF ``generate`` (left padding, chat template with the generation prompt); greedy at temperature 0,
    else plain temperature sampling seeded per batch. The answer is decoded up to its first EOS, without
    special tokens, and stripped. With an (opened) ``store``, answers are appended to its ``answers.jsonl``
    batch by batch and reused on the next call, so a killed run does not generate them again.
    ``show_progress``: a bar over the answers (:func:`src.data.progress.phase_progress`).
    """
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise InvalidParameterError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}, temperature="
                                    f"{temperature}: use max_new_tokens >= 1, batch_size >= 1, temperature >= 0")
    _unique_ids((item for item, _ in prompts), "prompts")
    settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "seed": int(seed)}
    done = store.answers(settings) if store is not None else {}
    answers = {item: row["answer"] for item, row in done.items()}
    todo = [(item, text) for item, text in prompts if done.get(item, {}).get("user") != text]
    # no bar when every answer is stored already (a second fit over the same store)
    with phase_progress("self-distillation: target answers", len(prompts), len(prompts) - len(todo), "answer",
                        show_progress and bool(todo)) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_seed = _stable_int(f"{seed}:{batch[0][0]}")
            texts = _generate_batch(target, tokenizer, [t for _, t in batch], max_new_tokens, temperature, batch_seed)
            rows = [{"item_id": item, "user": text, "answer": answer, "settings": settings}
                    for (item, text), answer in zip(batch, texts)]
            if store is not None:
                store.add_answers(rows)
            answers.update((row["item_id"], row["answer"]) for row in rows)
            bar.update(len(batch))
    return [Conversation(item, [_user(text), {"role": "assistant", "content": answers[item]}])
            for item, text in prompts]


@torch.inference_mode()
def _generate_batch(
    target, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, seed: int
) -> list[str]:
    from transformers import GenerationConfig

    pad = _pad_id(tokenizer)
    eos = sorted(eos_token_ids(target, tokenizer))
    input_ids, attention_mask = _pad([_chat_ids(tokenizer, [_user(t)], True) for t in texts], pad, left=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    device = input_device(target)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = target.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
    new_tokens = output[:, input_ids.shape[1] :].tolist()  # (B, <= max_new_tokens)
    return [tokenizer.decode(_until_eos(row, set(eos)), skip_special_tokens=True).strip() for row in new_tokens]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    end = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
    return tokens[:end]


# ---------------------------------------------------------------- the store


@dataclass
class EncodedItem:
    item_id: str
    input_ids: list[int]  # (T,) the whole conversation, cut at max_length
    loss_mask: list[int]  # (T,) 1 where token t and t + 1 are both in the answer region
    truncated: bool


def feature_meta(
    target_identity: dict[str, Any],
    tokenizer=None,
    feature_dtype: str = "bfloat16",
    max_length: int = 1024,
    sources: Sequence[str] = (),
    aux_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A ``meta.json`` for a store: what its features depend on (``target_identity``: e.g. ``ModelSpec.identity()``).
    Any dict works as meta; the store reads ``feature_dtype`` (default bfloat16), ``max_length`` and ``aux_layers``
    (EAGLE-3 stores only) from it."""
    template = getattr(tokenizer, "chat_template", None)
    return {
        "kind": "eagle_features",
        "target": dict(target_identity),
        "feature_dtype": feature_dtype,
        "max_length": int(max_length),
        "sources": [str(s) for s in sources],
        "chat_template_sha": hashlib.sha256(template.encode()).hexdigest()[:16] if isinstance(template, str) else None,
        **({"aux_layers": [int(i) for i in aux_layers]} if aux_layers is not None else {}),
    }


class FeatureStore:
    """Append-only, resumable store of target features (module docstring)."""

    kind = "EAGLE feature store"  # how messages name it (e.g. what a stopped fit keeps)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._next_shard: int | None = None

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    @property
    def items_path(self) -> Path:
        return self.root / "items.jsonl"

    @property
    def answers_path(self) -> Path:
        return self.root / "answers.jsonl"

    def open(self, meta: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made with the same settings."""
        if meta.get("feature_dtype", "bfloat16") not in FEATURE_DTYPES:
            raise InvalidParameterError(f"feature_dtype {meta.get('feature_dtype')!r} is invalid: use one of "
                                        f"{sorted(FEATURE_DTYPES)}")
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        existing = read_meta(self.meta_path)
        if existing and "aux_layers" not in meta and "aux_layers" in existing:  # an EAGLE-3 store serves EAGLE-1/2
            meta = {**meta, "aux_layers": existing["aux_layers"]}
        if existing and "aux_layers" in meta and "aux_layers" not in existing:
            raise IncompatibleModelsError(
                f"feature store {self.root} is an EAGLE-1/2 store (final features only) but this fit needs the "
                f"inputs of target layers {meta['aux_layers']} (EAGLE-3): choose another store_dir for it")
        guard_meta(self.meta_path, meta, f"feature store {self.root} was built", "delete it or choose another dir")
        for path in (self.items_path, self.answers_path):  # a killed run's cut line: aside, never joined to a row
            repair_lines(path)

    def meta(self) -> dict[str, Any]:
        return read_meta(self.meta_path)

    def dtype(self) -> torch.dtype:
        return FEATURE_DTYPES[self.meta().get("feature_dtype", "bfloat16")]

    def aux_layers(self) -> tuple[int, ...] | None:
        """The target layers whose inputs the store keeps as ``aux_features`` (EAGLE-3), or None."""
        layers = self.meta().get("aux_layers")
        return tuple(int(i) for i in layers) if layers is not None else None

    def finished_items(self) -> dict[str, dict[str, Any]]:
        """item id -> its row in ``items.jsonl`` (the last row wins)."""
        return {row["item_id"]: row for row in read_rows(self.items_path)}

    def add_batch(self, items: Sequence[EncodedItem], features: Sequence[torch.Tensor]) -> str:
        """Write one batch: its shard first, then one row per item (which marks it finished). Returns the shard."""
        index = self._shard_index()
        shard = f"shards/{index:06d}.safetensors"
        self._write_shard(shard, _pack(items, features, self.dtype(), self.aux_layers() is not None))
        self._write_rows([
            {"item_id": item.item_id, "shard": shard, "index": i, "tokens": len(item.input_ids),
             "answer_tokens": int(sum(item.loss_mask)), "truncated": item.truncated}
            for i, item in enumerate(items)
        ])
        self._next_shard = index + 1
        return shard

    def _shard_index(self) -> int:
        if self._next_shard is None:
            named = [int(Path(row["shard"]).stem) for row in self.finished_items().values()]
            self._next_shard = max(named, default=-1) + 1
        return self._next_shard

    def _write_shard(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.root / shard
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, path)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        append_rows(self.items_path, rows)

    def answers(self, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """item id -> answer row of ``answers.jsonl``; refuses answers generated with other settings."""
        if not self.meta_path.is_file():
            raise InvalidParameterError(f"feature store {self.root} is not open: call store.open(feature_meta(...)) "
                                        "before generating answers into it")
        rows = read_rows(self.answers_path)
        settings = json.loads(json.dumps(settings))
        for row in rows:
            if row.get("settings") != settings:
                differing = sorted(k for k in settings if row.get("settings", {}).get(k) != settings[k])
                raise IncompatibleModelsError(
                    f"{self.answers_path} holds answers generated with other settings ({', '.join(differing)} "
                    "differ): delete it or choose another dir"
                )
        return {row["item_id"]: row for row in rows}

    def add_answers(self, rows: list[dict[str, Any]]) -> None:
        append_rows(self.answers_path, rows)


def _pack(
    items: Sequence[EncodedItem], features: Sequence[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype, with_aux: bool = False,
) -> dict[str, torch.Tensor]:
    """The shard tensors of one batch (module docstring); ``features``: (T_i, H) per item, or (final (T_i, H),
    aux (T_i, 3H)) pairs in an EAGLE-3 store."""
    lengths = [len(item.input_ids) for item in items]
    finals = [f[0] if with_aux else f for f in features]
    if [f.shape[0] for f in finals] != lengths:
        raise ValueError(f"features of lengths {[f.shape[0] for f in finals]} for items of lengths {lengths}")
    packed = {
        "input_ids": torch.tensor([t for item in items for t in item.input_ids], dtype=torch.int32),  # (N,)
        "features": torch.cat([f.to(dtype) for f in finals]).contiguous(),  # (N, H)
        "loss_mask": torch.tensor([m for item in items for m in item.loss_mask], dtype=torch.uint8),  # (N,)
        "offsets": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64),  # (B + 1,)
    }
    if with_aux:
        packed["aux_features"] = torch.cat([f[1].to(dtype) for f in features]).contiguous()  # (N, 3H)
    return packed


# ---------------------------------------------------------------- teacher-forced features


def encode_conversation(
    tokenizer, conversation: Conversation, max_length: int, eos_ids: set[int]
) -> EncodedItem | None:
    """The chat-template ids of a whole conversation and its loss mask; None when no answer pair fits."""
    messages = conversation.messages
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise InvalidParameterError(f"conversation {conversation.item_id!r} must end with an assistant message "
                                    "after at least one other message (its answer)")
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    prompt = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    start = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), len(prompt)))
    end = next((t + 1 for t in range(start, len(full)) if full[t] in eos_ids), len(full))
    ids = full[:max_length]
    end = min(end, len(ids))
    if end - start < 2:
        return None
    mask = [1 if start <= t < end - 1 else 0 for t in range(len(ids))]
    return EncodedItem(conversation.item_id, ids, mask, truncated=len(full) > max_length)


@torch.inference_mode()
def target_features(
    target, batch: Sequence[EncodedItem], dtype: torch.dtype, aux_layers: Sequence[int] | None = None
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-norm last hidden states (T_i, H) of each item, on the CPU in ``dtype``: one right-padded forward of
    the decoder alone (the lm_head is not needed and costs ~20% of the compute). With ``aux_layers`` (EAGLE-3),
    (final (T_i, H), aux (T_i, 3H)) pairs from the same forward (:func:`src.decoding.base.layer_features`)."""
    device = input_device(target)
    input_ids, attention_mask = _pad([item.input_ids for item in batch], 0, left=False)  # (B, T), (B, T)
    decoder = target.get_decoder()
    out = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                  output_hidden_states=aux_layers is not None)
    hidden = out.last_hidden_state  # (B, T, H)
    if aux_layers is None:
        return [hidden[row, : len(item.input_ids)].to(dtype).cpu() for row, item in enumerate(batch)]
    aux = layer_features(out.hidden_states, tuple(aux_layers))  # (B, T, 3H)
    return [(hidden[row, : len(item.input_ids)].to(dtype).cpu(), aux[row, : len(item.input_ids)].to(dtype).cpu())
            for row, item in enumerate(batch)]


def build_features(
    target,
    tokenizer,
    conversations: Sequence[Conversation],
    store: FeatureStore,
    batch_size: int = 8,
    max_length: int = 1024,
    token_budget: int | None = None,
    time_budget_s: float | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Teacher-force ``target`` over every unfinished conversation and append its features to ``store``.

    Items are sorted by length (longest first) and batched; already finished items are skipped (resume). Stops
    before the next batch once ``token_budget`` tokens were written or ``time_budget_s`` has passed; running
    again with the same store continues. Returns the counts (tokens, tokens_per_s, items_done, items_skipped,
    items_unusable, items_left, stopped, message). ``show_progress``: a bar over the conversations, starting at
    those already stored (:func:`src.data.progress.phase_progress`).
    """
    _check_build_args(store, batch_size, max_length)
    conversations = [Conversation(*c) for c in conversations]  # plain (item_id, messages) tuples work too
    _unique_ids((c.item_id for c in conversations), "conversations")
    finished = store.finished_items()
    todo = [c for c in conversations if c.item_id not in finished]
    eos_ids = eos_token_ids(target, tokenizer)
    # Two chat-template renders per conversation: seconds for thousands, so a bar only when it takes that long.
    with phase_progress("features: tokenizing conversations", len(todo), unit="conversation",
                        enabled=show_progress, delay_s=QUICK_PHASE_DELAY_S) as bar:
        encoded = []
        for conversation in todo:
            encoded.append(encode_conversation(tokenizer, conversation, max_length, eos_ids))
            bar.update()
    items = sorted((e for e in encoded if e is not None), key=lambda e: (-len(e.input_ids), e.item_id))
    stats: dict[str, Any] = {
        "tokens": 0, "answer_tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "items_done": 0,
        "items_skipped": len(conversations) - len(todo), "items_unusable": len(encoded) - len(items),
        "items_left": len(items), "stopped": None, "message": "",
    }
    started = time.perf_counter()
    # The bar counts the usable conversations: one with no answer token within max_length is never stored.
    with phase_progress("features: target hidden states", stats["items_skipped"] + len(items),
                        stats["items_skipped"], "conversation", show_progress and bool(items)) as bar:
        for first in range(0, len(items), batch_size):
            stats["stopped"] = _budget_hit(stats["tokens"], token_budget, time.perf_counter() - started, time_budget_s)
            if stats["stopped"]:
                break
            batch = items[first : first + batch_size]
            store.add_batch(batch, target_features(target, batch, store.dtype(), store.aux_layers()))
            _count_batch(stats, batch, time.perf_counter() - started)
            bar.set_postfix_str(f"{stats['tokens']} tokens, {stats['tokens_per_s']:.0f} tokens/s", refresh=False)
            bar.update(len(batch))
    stats["seconds"] = round(time.perf_counter() - started, 3)
    stats["message"] = _build_message(stats, store)
    (log.warning if stats["stopped"] else log.info)(stats["message"])
    return stats


def _check_build_args(store: FeatureStore, batch_size: int, max_length: int) -> None:
    meta = store.meta()
    if not meta:
        raise InvalidParameterError(f"feature store {store.root} is not open: call store.open(feature_meta(...)) "
                                    "before building features")
    if batch_size < 1 or max_length < 2:
        raise InvalidParameterError(f"batch_size={batch_size}, max_length={max_length}: use batch_size >= 1 "
                                    "and max_length >= 2")
    if meta.get("max_length", max_length) != max_length:
        raise InvalidParameterError(f"max_length={max_length} but feature store {store.root} was opened with "
                                    f"max_length={meta['max_length']}: pass the same value or choose another dir")


def _budget_hit(tokens: int, token_budget: int | None, elapsed: float, time_budget_s: float | None) -> str | None:
    if token_budget is not None and tokens >= token_budget:
        return "token_budget"
    if time_budget_s is not None and elapsed >= time_budget_s:
        return "time_budget"
    return None


def _count_batch(stats: dict[str, Any], batch: Sequence[EncodedItem], elapsed: float) -> None:
    stats["tokens"] += sum(len(item.input_ids) for item in batch)
    stats["answer_tokens"] += sum(sum(item.loss_mask) for item in batch)
    stats["items_done"] += len(batch)
    stats["items_left"] -= len(batch)
    stats["tokens_per_s"] = round(stats["tokens"] / max(elapsed, 1e-9), 1)


def _build_message(stats: dict[str, Any], store: FeatureStore) -> str:
    done = (f"wrote {stats['items_done']} items ({stats['tokens']} tokens, {stats['tokens_per_s']} tokens/s) "
            f"to {store.root}; {stats['items_skipped']} were already there, {stats['items_unusable']} have no "
            "answer token within max_length")
    if not stats["stopped"]:
        return done
    return (f"stopped by the {stats['stopped'].replace('_', ' ')} with {stats['items_left']} items left: {done}; "
            "run build_features again on the same store to continue")


# ---------------------------------------------------------------- reading back


def in_val_split(item_id: str, val_fraction: float) -> bool:
    """Whether an item belongs to the validation split: a fixed function of its id (never of the order)."""
    return _stable_int(item_id) / 16**15 < val_fraction


class FeatureDataset(torch.utils.data.Dataset):
    """Whole sequences of a feature store: ``{"input_ids": (T,) long, "features": (T, H) float32,
    "loss_mask": (T,) bool, "item_index": int}``, in item-id order, split into train/val by item-id hash."""

    def __init__(
        self, root: str | Path, split: str = "train", val_fraction: float = 0.05, max_length: int | None = None,
        with_aux: bool = False,
    ) -> None:
        if split not in ("train", "val") or not 0 <= val_fraction < 1 or (max_length is not None and max_length < 2):
            raise InvalidParameterError(f"split={split!r}, val_fraction={val_fraction}, max_length={max_length}: "
                                        "use split 'train' or 'val', 0 <= val_fraction < 1, max_length >= 2")
        self.root, self.max_length, self.with_aux = Path(root), max_length, with_aux
        rows = FeatureStore(root).finished_items()
        if not rows:
            raise MissingInputError(f"feature store {self.root} has no finished items: mine some with "
                                    "src.data.features.build_features")
        self.rows = sorted((r for r in rows.values() if in_val_split(r["item_id"], val_fraction) == (split == "val")),
                           key=lambda r: r["item_id"])
        if not self.rows:
            raise InvalidParameterError(f"feature store {self.root} has {len(rows)} items and none falls in the "
                                        f"{split} split (val_fraction={val_fraction}): mine more items "
                                        "(build_features) or change val_fraction")

    def __len__(self) -> int:
        return len(self.rows)

    def token_ids(self) -> Iterator[torch.Tensor]:
        """The input ids (T,) of every item, without reading its features."""
        from safetensors import safe_open

        for row in self.rows:
            with safe_open(str(self.root / row["shard"]), framework="pt") as shard:
                start, end = shard.get_slice("offsets")[row["index"] : row["index"] + 2].tolist()
                if self.max_length is not None:
                    end = min(end, start + self.max_length)
                yield shard.get_slice("input_ids")[start:end].long()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        row = self.rows[index]
        path = self.root / row["shard"]
        if not path.is_file():
            raise MalformedInputError(f"{path} is missing but {self.root / 'items.jsonl'} names it: delete the "
                                      "feature store and build it again")
        with safe_open(str(path), framework="pt") as shard:
            start, end = shard.get_slice("offsets")[row["index"] : row["index"] + 2].tolist()
            if self.max_length is not None:
                end = min(end, start + self.max_length)
            loss_mask = shard.get_slice("loss_mask")[start:end].bool()  # (T,)
            loss_mask[-1] = False  # position t needs f_{t+1}, which a cut sequence may lack
            item = {
                "input_ids": shard.get_slice("input_ids")[start:end].long(),  # (T,)
                "features": shard.get_slice("features")[start:end].float(),  # (T, H)
                "loss_mask": loss_mask,
                "item_index": index,  # lets a data-parallel validation count a padded-in repeat once
            }
            if self.with_aux:
                item["aux_features"] = shard.get_slice("aux_features")[start:end].float()  # (T, 3H)
            return item


def collate_sequences(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad sequences to the longest: input_ids (B, T) long, features (B, T, H) float32, loss_mask (B, T)
    bool (False on padding), attention_mask (B, T) bool (True on real positions), item_index (B,) long (-1 when
    an item has none)."""
    lengths = [len(item["input_ids"]) for item in batch]
    width, hidden = max(lengths), batch[0]["features"].shape[-1]
    out = {
        "input_ids": torch.zeros((len(batch), width), dtype=torch.long),
        "features": torch.zeros((len(batch), width, hidden), dtype=torch.float32),
        "loss_mask": torch.zeros((len(batch), width), dtype=torch.bool),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.bool),
        "item_index": torch.tensor([int(item.get("item_index", -1)) for item in batch], dtype=torch.long),
    }
    if "aux_features" in batch[0]:  # an EAGLE-3 store: (B, T, 3H) float32
        out["aux_features"] = torch.zeros((len(batch), width, batch[0]["aux_features"].shape[-1]))
        for row, (item, length) in enumerate(zip(batch, lengths)):
            out["aux_features"][row, :length] = item["aux_features"]
    for row, (item, length) in enumerate(zip(batch, lengths)):
        out["input_ids"][row, :length] = item["input_ids"]
        out["features"][row, :length] = item["features"]
        out["loss_mask"][row, :length] = item["loss_mask"]
        out["attention_mask"][row, :length] = True
    return out


# ---------------------------------------------------------------- evaluation overlap


def _normalize(text: str) -> str:
    return " ".join(text.split())


def overlap_warning(conversations: Sequence[Conversation], evaluation_texts: Iterable[str]) -> str | None:
    """A one-line warning when training conversations have a user message equal (whitespace-normalized) to an
    evaluation prompt (e.g. MT-Bench / Spec-Bench first turns); None when none has."""
    evaluation = {_normalize(text) for text in evaluation_texts}
    hits = [item_id for item_id, messages in conversations
            if any(m["role"] == "user" and _normalize(m["content"]) in evaluation for m in messages)]
    if not hits:
        return None
    return (f"{len(hits)} of {len(conversations)} training conversations (e.g. {hits[0]}) have a user prompt equal "
            "to an evaluation prompt: drop them, or the draft head is evaluated on prompts it was trained on")
