"""Decoding algorithms: plain torch + transformers, no Lightning. One file per method.

Probability convention everywhere: ``p`` = target distribution, ``q`` = draft distribution.
"""

from src.decoding.base import DecodingMethod
from src.decoding.baseline import Baseline
from src.decoding.sampling import SamplingConfig, logits_to_probs, sample
from src.decoding.specexec import SpecExec
from src.decoding.speculative import SpeculativeSampling
from src.decoding.stats import Generation, GenerationStats

__all__ = [
    "Baseline",
    "DecodingMethod",
    "Generation",
    "GenerationStats",
    "SamplingConfig",
    "SpecExec",
    "SpeculativeSampling",
    "logits_to_probs",
    "sample",
]
