"""The Gumbel-softmax simplex flow: time mapping, Concrete density, exact posterior, Euler sampler on the simplex."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import RelaxedOneHotCategorical

from guidance.analytic.categorical import AnalyticSimplexFlow, CategoricalMixture
from guidance.sequences.simplex import (GumbelSoftmaxPath, SimplexFlow, check_simplex, sample_sequences,
                                     tangent_projection)

PATH = GumbelSoftmaxPath()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _prior(length=12, vocab=4, components=3, seed=0):
    return CategoricalMixture.random(components, length, vocab, generator=_gen(seed))


def test_temperature_runs_in_paper_time():
    """tau(t) = tau_max exp(-lambda t) with t = 1 - s: tau_max at the noise end, tau_max e^-lambda at the data end."""
    assert PATH.temperature(1.0) == pytest.approx(10.0)
    assert PATH.temperature(0.0) == pytest.approx(10.0 * math.exp(-3.0))
    assert PATH.temperature(torch.tensor(0.25)).item() == pytest.approx(10.0 * math.exp(-3.0 * 0.75), rel=1e-6)


def test_log_likelihood_is_the_concrete_density():
    """log q(x | k) equals torch's RelaxedOneHotCategorical (location beta e_k, temperature beta tau) up to a
    k-independent constant."""
    x = PATH.interpolate(torch.tensor([[0, 2, 1]]), 3, 0.4, _gen(1)).double()
    ell = PATH.log_likelihood(x, 0.4)[0]  # (L, K)
    tau = PATH.temperature(0.4)
    for position in range(3):
        exact = torch.stack([
            RelaxedOneHotCategorical(torch.tensor(PATH.noise_scale * tau, dtype=torch.float64),
                                     logits=PATH.noise_scale * F.one_hot(torch.tensor(k), 3).double())
            .log_prob(x[0, position]) for k in range(3)])
        difference = exact - ell[position]
        assert torch.allclose(difference, difference[0].expand(3), atol=1e-8)


def test_interpolant_keeps_the_clean_token_with_the_gumbel_max_probability():
    """argmax(e_k + g / beta) = k with probability e^beta / (e^beta + K - 1), at any time."""
    tokens = torch.zeros(20000, 1, dtype=torch.long)
    x = PATH.interpolate(tokens, 4, 0.7, _gen(2))
    check_simplex(x)
    expected = math.exp(PATH.noise_scale) / (math.exp(PATH.noise_scale) + 3)
    assert (x.argmax(-1) == 0).double().mean().item() == pytest.approx(expected, abs=0.012)


def test_velocity_is_the_noise_free_path_derivative_in_toolkit_time():
    """With p = e_k the velocity is d/ds softmax(e_k / tau(s)) (a central difference), and rows sum to zero."""
    onehot = F.one_hot(torch.tensor([[1, 3]]), 4).double()
    s, h = 0.6, 1e-5

    def x_at(sigma):
        return torch.softmax(onehot / PATH.temperature(sigma), -1)

    v = PATH.velocity(x_at(s), onehot, torch.tensor(s, dtype=torch.float64))
    assert torch.allclose(v, (x_at(s + h) - x_at(s - h)) / (2 * h), atol=1e-7)
    assert torch.allclose(v.sum(-1), torch.zeros(1, 2, dtype=torch.float64), atol=1e-12)


def test_tangent_projection_rows_sum_to_zero():
    x = torch.softmax(torch.randn(3, 5, 4, generator=_gen(3)), -1)
    g = torch.randn(3, 5, 4, generator=_gen(4))
    assert torch.allclose(tangent_projection(x, g).sum(-1), torch.zeros(3, 5), atol=1e-6)


def test_analytic_posterior_matches_brute_force_enumeration():
    """p(x_1 | x_s) from the closed form equals Bayes' rule over all K^L sequences with torch's Concrete density."""
    prior = _prior(length=3, vocab=3, components=2, seed=5)
    flow = AnalyticSimplexFlow(prior)
    sigma = 0.35
    x = PATH.interpolate(prior.sample(2, _gen(6)), 3, sigma, _gen(7)).double()
    tau = PATH.temperature(sigma)
    sequences = torch.tensor(list(itertools.product(range(3), repeat=3)))
    for b in range(2):
        log_joint = prior.log_prob(sequences).clone()
        for i, seq in enumerate(sequences):
            for position, k in enumerate(seq):
                dist = RelaxedOneHotCategorical(torch.tensor(PATH.noise_scale * tau, dtype=torch.float64),
                                                logits=PATH.noise_scale * F.one_hot(k, 3).double())
                log_joint[i] += dist.log_prob(x[b, position])
        weights = torch.softmax(log_joint, 0)
        brute = torch.stack([(weights[:, None] * F.one_hot(sequences[:, p], 3)).sum(0) for p in range(3)])
        assert torch.allclose(flow.posterior(x[b:b + 1], sigma)[1][0], brute, atol=1e-10)


def test_sampler_stays_on_the_simplex_and_reproduces_the_prior_marginals():
    prior = _prior()
    flow = AnalyticSimplexFlow(prior)
    states = []
    out = sample_sequences(flow, 40, batch_size=1024, generator=_gen(8), progress=False,
                           callback=lambda d: states.append(d["x"]))
    for x in [*states, out.x]:
        check_simplex(x)
    assert out.tokens.shape == (1024, 12) and out.sigmas[0] == 1 and out.sigmas[-1] == 0
    marginals = prior.marginals().float()
    sampled = F.one_hot(out.tokens, 4).float().mean(0)
    tv = 0.5 * (sampled - marginals).abs().sum(-1).mean().item()
    tv_uniform = 0.5 * (0.25 - marginals).abs().sum(-1).mean().item()
    assert tv < 0.5 * tv_uniform, (tv, tv_uniform)
    data_logp = prior.log_prob(prior.sample(1024, _gen(9))).mean().item()
    assert abs(prior.log_prob(out.tokens).mean().item() - data_logp) < 2.0
    again = sample_sequences(flow, 40, batch_size=1024, generator=_gen(8), progress=False)
    assert torch.equal(again.x, out.x)


@pytest.mark.parametrize("x, message", [
    (torch.tensor([[[0.5, 0.7, -0.2]]]), "negative"),
    (torch.tensor([[[0.5, 0.2, 0.2]]]), "sum to 1"),
    (torch.tensor([[[float("nan"), 0.5, 0.5]]]), "NaN"),
    (torch.tensor([[0.5, 0.5]]), "shape"),
])
def test_rows_off_the_simplex_are_rejected(x, message):
    with pytest.raises(ValueError, match=message):
        check_simplex(x)
    flow = AnalyticSimplexFlow(CategoricalMixture([1.0], torch.full((1, 1, 3), 1 / 3)))
    with pytest.raises(ValueError, match=message):
        sample_sequences(flow, 2, latents=x, progress=False)


@pytest.mark.parametrize("length, vocab", [(0, 4), (4, 0), (2.5, 4)])
def test_length_and_vocabulary_must_be_positive(length, vocab):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        SimplexFlow(length, vocab)


def test_the_simplex_flow_takes_no_prompt():
    with pytest.raises(ValueError, match="takes no prompt"):
        AnalyticSimplexFlow(_prior()).condition("a prompt")
