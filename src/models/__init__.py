"""Model loading: specs, the embedded default, the tokenizer guard and the target/draft pair."""

from src.models.loading import LoadedModel, load_model, load_tokenizer
from src.models.pair import ModelPair, load_pair
from src.models.spec import ModelSpec
from src.models.tokenizer_guard import TokenizerMismatchError, check_tokenizers

__all__ = [
    "LoadedModel",
    "ModelPair",
    "ModelSpec",
    "TokenizerMismatchError",
    "check_tokenizers",
    "load_model",
    "load_pair",
    "load_tokenizer",
]
