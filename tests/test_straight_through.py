"""Straight-through guidance on the analytic simplex prior, and the best-of-N baseline."""

import pytest
import torch
import torch.nn.functional as F

from guidance import AnalyticGMMFlow, CallableObjective, ClassifierObjective, get_method, sample
from guidance.methods.best_of_n import best_of_n
from guidance.methods.straight_through import hard_samples, straight_through, straight_through_gradient
from guidance.analytic.categorical import AnalyticSimplexFlow, CategoricalMixture
from guidance.sequences.simplex import sample_sequences

L, K = 12, 4
PRIOR = CategoricalMixture.random(3, L, K, generator=torch.Generator().manual_seed(0))
FLOW = AnalyticSimplexFlow(PRIOR)
WEIGHTS = torch.randn(L, K, generator=torch.Generator().manual_seed(5))


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


class LinearSequenceClassifier(torch.nn.Module):
    """A known differentiable two-class classifier on one-hot rows: logit of class 1 = <w, h>."""

    def __init__(self, weights=WEIGHTS):
        super().__init__()
        self.weights = weights
        self.vocab_size = weights.shape[-1]

    def forward(self, h):
        score = (h * self.weights).sum((-1, -2))
        return torch.stack([-score / 2, score / 2], dim=1)


def _objective(weights=WEIGHTS):
    return ClassifierObjective(LinearSequenceClassifier(weights), 1, space="latent", num_classes=2)


def _score(tokens):
    """The classifier's probability of class 1 for hard sequences, averaged."""
    return torch.sigmoid((F.one_hot(tokens, K).float() * WEIGHTS).sum((-1, -2))).mean().item()


def _run(**options):
    method = get_method("straight_through", **options)
    return method(FLOW, _objective(), num_steps=50, batch_size=512, generator=_gen(), progress=False)


@pytest.fixture(scope="module")
def unguided():
    return sample_sequences(FLOW, 50, batch_size=512, generator=_gen(), progress=False)


@pytest.mark.parametrize("source, draw", [("state", "sample"), ("state", "argmax"), ("endpoint", "sample"),
                                          ("endpoint", "argmax")])
def test_guidance_raises_the_score_and_stays_in_the_prior(unguided, source, draw):
    """Over 512 samples: the classifier's mean probability rises by at least 0.3 over unguided sampling (0.44),
    while the mean prior log-probability stays within 1.5 nats of unguided samples."""
    result = _run(gamma=1.0, samples=8, source=source, draw=draw)
    assert _score(result.info["tokens"]) > _score(unguided.tokens) + 0.3
    logp_guided = PRIOR.log_prob(result.info["tokens"]).mean().item()
    logp_unguided = PRIOR.log_prob(unguided.tokens).mean().item()
    assert logp_guided > logp_unguided - 1.5, (logp_guided, logp_unguided)
    assert result.info["loss"].shape == (50, 512) and result.info["objective_calls"] == 400 and result.nfe == 50


def test_a_wrong_signed_update_lowers_the_score(unguided):
    """The same run steering toward class 0 must push the class-1 score below unguided sampling."""
    objective = ClassifierObjective(LinearSequenceClassifier(), 0, space="latent", num_classes=2)
    result = straight_through(FLOW, objective, num_steps=50, batch_size=512, generator=_gen(), progress=False)
    assert _score(result.info["tokens"]) < _score(unguided.tokens) - 0.3


def test_gamma_zero_is_unguided_sampling_bit_for_bit(unguided):
    result = _run(gamma=0.0)
    assert torch.equal(result.x, unguided.x) and torch.equal(result.info["tokens"], unguided.tokens)


def test_gradient_passes_straight_through_the_hard_samples():
    x = sample_sequences(FLOW, 10, batch_size=4, generator=_gen(2), progress=False).x
    hard = hard_samples(x, 6, "sample", _gen(3))
    assert hard.shape == (6, 4, L, K) and torch.equal(hard.sum(-1), torch.ones(6, 4, L))
    loss, g = straight_through_gradient(_objective(), FLOW, x, hard)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # the loss is that of the hard samples, not of the soft state
    expected = _objective()(FLOW, hard.reshape(24, L, K)).reshape(6, 4).mean(0)
    assert torch.allclose(loss, expected)
    # plain autograd cannot see through a categorical draw: the hard sample carries no graph at all
    soft = x.clone().requires_grad_(True)
    drawn = F.one_hot(torch.multinomial(soft.reshape(-1, K), 1, generator=_gen(3)), K).float()
    assert not drawn.requires_grad


class RecordingFlow(AnalyticSimplexFlow):
    """Records, for every endpoint evaluation, whether autograd was on or the state carried a graph."""

    def __init__(self, prior):
        super().__init__(prior)
        self.differentiated = []

    def endpoint(self, x, sigma, cond=None):
        self.differentiated.append(torch.is_grad_enabled() or x.requires_grad)
        return super().endpoint(x, sigma, cond)


def test_the_flow_is_never_differentiated():
    flow = RecordingFlow(PRIOR)
    straight_through(flow, _objective(), num_steps=8, batch_size=4, generator=_gen(), progress=False)
    assert flow.differentiated == [False] * 8


def test_window_and_callback():
    seen = []
    result = straight_through(FLOW, _objective(), num_steps=10, batch_size=2, generator=_gen(), progress=False,
                              window=(2, 6), callback=lambda d: seen.append(d["loss"] is not None))
    assert result.info["guided_steps"] == [2, 3, 4, 5]
    assert seen == [i in range(2, 6) for i in range(10)]


def test_same_seed_same_sequences():
    a = _run(gamma=1.0)
    b = _run(gamma=1.0)
    assert torch.equal(a.x, b.x)


def test_best_of_n_keeps_the_lowest_loss_candidate():
    objective = _objective()
    result = best_of_n(FLOW, objective, num_steps=20, batch_size=3, generator=_gen(), progress=False, candidates=5)
    everything = sample_sequences(FLOW, 20, batch_size=15, generator=_gen(), progress=False)
    losses = objective(FLOW, F.one_hot(everything.tokens, K).float()).reshape(3, 5)
    assert torch.equal(result.info["chosen"], losses.argmin(1))
    assert torch.equal(result.info["tokens"], everything.tokens.reshape(3, 5, L)[torch.arange(3), losses.argmin(1)])
    assert result.nfe == 100 and result.info["objective_calls"] == 5


def test_best_of_n_on_an_image_flow():
    d = 4
    flow = AnalyticGMMFlow(torch.tensor([0.5, 0.5]), torch.stack([torch.full((d,), -0.5), torch.full((d,), 0.5)]),
                           0.05 * torch.eye(d).expand(2, d, d), (1, 2, 2))
    objective = CallableObjective(lambda x: x.flatten(1).mean(1), space="latent")  # prefers the dark mode
    result = best_of_n(flow, objective, num_steps=10, batch_size=2, generator=_gen(), progress=False, candidates=6)
    everything = sample(flow, num_steps=10, batch_size=12, generator=_gen(), progress=False)
    candidates = everything.x.reshape(2, 6, 1, 2, 2)
    assert torch.equal(result.info["chosen"], candidates.mean((2, 3, 4)).argmin(1))
    assert torch.equal(result.x, candidates[torch.arange(2), result.info["chosen"]])
    assert result.x.mean() < everything.x.mean()


def test_vocabulary_mismatch_is_named():
    wrong = ClassifierObjective(LinearSequenceClassifier(torch.randn(L, K + 1)), 1, space="latent", num_classes=2)
    with pytest.raises(ValueError, match="vocabulary of 5 tokens but the flow's sequences have 4"):
        straight_through(FLOW, wrong, num_steps=2, progress=False)
    undeclared = CallableObjective(lambda h: (h * torch.randn(L, K + 1)).sum((-1, -2)), space="latent")
    with pytest.raises(ValueError, match="cannot score a one-hot sequence of shape"):
        straight_through(FLOW, undeclared, num_steps=2, progress=False)


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, "samples \\(M\\) must be an integer >= 1"),
    ({"gamma": -1.0}, "gamma must be a number >= 0"),
    ({"source": "prior"}, "source must be one of"),
    ({"draw": "top"}, "draw must be one of"),
    ({"height": 32}, "no image size"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        straight_through(FLOW, _objective(), num_steps=2, progress=False, **options)


def test_image_models_are_pointed_to_hard_input_objectives():
    flow = AnalyticGMMFlow(torch.tensor([1.0]), torch.zeros(1, 4), torch.eye(4)[None], (1, 2, 2))
    with pytest.raises(ValueError, match="HardInputObjective"):
        straight_through(flow, _objective(), num_steps=2, progress=False)


def test_rows_off_the_simplex_are_rejected_as_latents():
    with pytest.raises(ValueError, match="do not sum to 1"):
        straight_through(FLOW, _objective(), num_steps=2, progress=False, latents=torch.full((1, L, K), 0.3))
