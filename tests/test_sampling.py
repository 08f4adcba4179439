"""logits -> probabilities: the one shared function every method uses for p (target) and q (draft)."""

import pytest
import torch

from src.decoding.sampling import (
    SamplingConfig,
    logits_to_probs,
    make_generator,
    residual_distribution,
    sample,
)


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_scales_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_k_tokens_renormalized():
    logits = torch.tensor([3.0, 1.0, 2.0, 0.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    expected = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    assert probs[1] == 0 and probs[3] == 0
    assert torch.allclose(probs[[0, 2]], expected)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs_in = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(probs_in.log(), SamplingConfig(temperature=1.0, top_p=0.8))
    # 0.5 + 0.3 reaches 0.8: the two most likely tokens stay
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # the top token always survives, even with a tiny top_p
    probs = logits_to_probs(probs_in.log(), SamplingConfig(temperature=1.0, top_p=0.01))
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_residual_distribution_is_normalized_positive_part():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(residual_distribution(p, p), p)


def test_sample_is_reproducible_with_seed():
    probs = torch.softmax(torch.randn(5, 50), -1)
    first = sample(probs, make_generator(123))
    second = sample(probs, make_generator(123))
    assert first.shape == (5,) and torch.equal(first, second)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"temperature": -0.1}, "temperature=-0.1"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"),
     ({"top_k": -1}, "top_k=-1")],
)
def test_bad_parameters_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        SamplingConfig(**kwargs)
