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


def test_sample_follows_each_row_law_and_never_draws_a_zero(goodness_of_fit):
    """Inverse-CDF sampling: rows drawn together each follow their own law; zero-probability tokens never come."""
    from collections import Counter

    from src.decoding.sampling import next_token

    probs = torch.zeros(2, 1000)
    probs[0, [0, 3, 999]] = torch.tensor([0.2, 0.5, 0.3])
    probs[1, 500:505] = torch.tensor([0.05, 0.05, 0.3, 0.3, 0.3])
    generator = make_generator(0)
    draws = torch.stack([sample(probs, generator) for _ in range(20_000)])  # (20000, 2)
    assert draws.shape == (20_000, 2) and draws.dtype == torch.long
    for row in range(2):
        counts = Counter((int(token),) for token in draws[:, row])
        assert all(probs[row, token] > 0 for (token,) in counts)
        exact = {(token,): float(probs[row, token]) for token in probs[row].nonzero().flatten().tolist()}
        assert goodness_of_fit(counts, exact) > 1e-3
    logits = torch.tensor([0.0, 3.0, 1.0])
    state = generator.get_state()
    assert next_token(logits, SamplingConfig(), generator) == 1 and torch.equal(generator.get_state(), state)
