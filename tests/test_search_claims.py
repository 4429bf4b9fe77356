"""What the search methods claim, checked on exact priors: the SDE's step count, particle search's FK-steering
options (the "add" potential, ESS-triggered resampling, the resampling window, the population) and its final
weights, and straight-through guidance's diversity setting."""

import pytest
import torch
import torch.nn.functional as F

import guidance.methods.particles as particle_module
from guidance import CallableObjective, ClassifierObjective, get_method
from guidance.methods.particles import ess, resampling_schedule
from tasks.studies import particle_benchmark as bench
from tasks.studies import sequence_benchmark as sequences
from tasks.studies.analytic_benchmark import smooth_image_prior
from tasks.studies.sde_steps import covariance_error, final_samples


# -- the SDE's discretisation --------------------------------------------------------------------------------
def test_a_large_eta_needs_many_steps_to_keep_the_marginals():
    """η = 8 at 10 uniform steps amplifies the directions in which a nearly degenerate prior hardly varies: its
    final covariance is far from the exact one, much further than the ODE's at 10 steps and than its own at 100."""
    flow = smooth_image_prior((1, 2, 2), components=2)
    exact = flow.marginal(0.0).covariance()
    error = {(n, eta): covariance_error(final_samples(flow, 1000, n, eta), exact) for n in (10, 100) for eta in (0, 8)}
    assert error[10, 8] > 10 * error[100, 8] and error[10, 8] > 10 * error[10, 0], error
    assert error[100, 8] < 0.2, error


# -- particle search: FK-steering's options ------------------------------------------------------------------
def smooth_problem():
    """The benchmark's 2-D mixture with a smooth reward r = -|x - (1, 1)|² (distinct weights at every step)."""
    flow, _, _ = bench.mixture_problem()
    target = torch.tensor([1.0, 1.0], dtype=torch.float64)
    objective = CallableObjective(lambda x: (x.flatten(1).double() - target).square().sum(1), space="latent")
    return flow, objective


def run_recorded(monkeypatch, **options):
    """A particles run on :func:`smooth_problem` with the rewards of every resampling step (callback) and the
    ancestors every resampling drew (the module's ``ancestors``, wrapped)."""
    drawn, rewards = [], []
    original = particle_module.ancestors

    def recording(log_weights, resampler, generator):
        a = original(log_weights, resampler, generator)
        drawn.append(a.clone())
        return a

    monkeypatch.setattr(particle_module, "ancestors", recording)
    flow, objective = smooth_problem()
    b, k = 3, 5

    def keep(state):
        if state["reward"] is not None:
            rewards.append(state["reward"].reshape(b, k).double())

    out = get_method("particles", particles=k, select="all", **options)(
        flow, objective, num_steps=6, batch_size=b, progress=False, callback=keep,
        generator=torch.Generator().manual_seed(0))
    return out, rewards, drawn


def test_the_add_potential_without_resampling_accumulates_the_sums_and_ends_at_exp_lambda_r(monkeypatch):
    """Never resampled (an ESS threshold no population falls below), the log-weights after resampling step t are
    λ Σ_{t'<=t} S_t', S_t' the sum of the rewards up to t'; the final correction leaves exp(λ r) of the final
    reward (plain importance sampling), whatever the potential."""
    lam = 0.7
    out, rewards, drawn = run_recorded(monkeypatch, temperature=lam, potential="add", ess_threshold=1e-9)
    assert drawn == [] and out.info["resamplings"].tolist() == [0, 0, 0]
    assert out.info["resampling_steps"] == [1, 2, 3, 4] and len(rewards) == 4
    sums = torch.cumsum(torch.stack(rewards), 0)  # S_t
    log_w = lam * torch.cumsum(sums, 0)  # λ Σ S
    torch.testing.assert_close(out.info["ess"].double(), ess(log_w.reshape(-1, 5)).reshape(4, 3), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.info["weights"].double(), torch.softmax(lam * out.info["rewards"].double(), -1),
                               rtol=1e-4, atol=1e-6)


def test_the_add_potential_weights_follow_the_ancestry(monkeypatch):
    """Resampled at every step: G_t = S_t (the particle's own sum of rewards, carried to its copies), resampling
    weights exp(λ G_t), and final weights exp(λ (r - Σ_t G_t)) along each particle's ancestry (hand computation)."""
    lam = 0.7
    out, rewards, drawn = run_recorded(monkeypatch, temperature=lam, potential="add")
    assert len(drawn) == len(rewards) == 4
    total = torch.zeros(3, 5, dtype=torch.float64)
    applied = torch.zeros_like(total)
    for t, (r, a) in enumerate(zip(rewards, drawn)):
        total = total + r
        torch.testing.assert_close(out.info["ess"][t].double(), ess(lam * total), rtol=1e-5, atol=0)
        applied = applied + total
        total, applied = total.gather(1, a), applied.gather(1, a)
    expected = torch.softmax(lam * (out.info["rewards"].double() - applied), -1)
    torch.testing.assert_close(out.info["weights"].double(), expected, rtol=1e-4, atol=1e-6)
    # the "difference" potential on the same run would telescope: its weights differ
    assert not torch.allclose(expected, torch.softmax(lam * (out.info["rewards"].double() - rewards[-1].gather(
        1, drawn[-1])), -1), atol=1e-3)


def test_an_ess_threshold_resamples_only_populations_whose_ess_fell_below_it():
    flow, objective = smooth_problem()
    k, threshold = 8, 0.5
    kw = dict(num_steps=10, batch_size=16, progress=False)
    run = get_method("particles", particles=k, temperature=0.5, ess_threshold=threshold)
    info = run(flow, objective, generator=torch.Generator().manual_seed(0), **kw).info
    below = info["ess"] < threshold * k
    assert torch.equal(info["resampled"], below)
    assert 0 < int(below.sum()) < below.numel()  # both decisions occur
    assert torch.equal(info["resamplings"], below.sum(0))
    assert bool((info["unique_ancestors"][~below] == k).all())  # skipped: every particle kept once
    assert bool((info["unique_ancestors"][below] < k).any())
    # uniform weights (λ = 0) never fall below the threshold; a steep reward always does
    flat = get_method("particles", particles=k, temperature=0.0, ess_threshold=threshold)
    assert flat(flow, objective, generator=torch.Generator().manual_seed(0), **kw).info["resamplings"].sum() == 0
    steep = get_method("particles", particles=k, temperature=50.0, ess_threshold=threshold)
    info = steep(flow, objective, generator=torch.Generator().manual_seed(0), **kw).info
    assert bool(info["resampled"].all())


def test_the_default_resamples_at_every_step_as_before():
    """No threshold: every population is resampled at every resampling step, and weights restart each time."""
    flow, objective = smooth_problem()
    info = get_method("particles", particles=4, temperature=0.5)(flow, objective, num_steps=6, batch_size=2,
                                                                 progress=False,
                                                                 generator=torch.Generator().manual_seed(0)).info
    assert bool(info["resampled"].all()) and info["resamplings"].tolist() == [4, 4]


def test_the_resampling_window_follows_fk_steering():
    """FK-steering resamples at arange(resampling_t_start, resampling_t_end + 1, resample_frequency)."""
    assert list(resampling_schedule(1, None, 10)) == list(range(1, 9))
    assert list(resampling_schedule(3, None, 10)) == [3, 6]
    assert list(resampling_schedule(2, (0, 7), 10)) == [0, 2, 4, 6]
    flow, objective = smooth_problem()
    out = get_method("particles", particles=3, every=2, window=(1, 8))(flow, objective, num_steps=10, progress=False,
                                                                      generator=torch.Generator().manual_seed(0))
    assert out.info["resampling_steps"] == [1, 3, 5, 7] and out.info["objective_calls"] == 3 * 5


def test_the_population_return_gives_every_particle_with_its_reward_and_weight():
    flow, objective = smooth_problem()
    b, k = 3, 6
    out = get_method("particles", particles=k, select="all", temperature=0.5)(
        flow, objective, num_steps=8, batch_size=b, progress=False, generator=torch.Generator().manual_seed(0))
    assert out.x.shape == (b * k, 2, 1, 1) and out.image.shape == (b * k, 2, 1, 1)
    assert "rows b·6 .. b·6 + 5" in out.info["layout"] and "chosen" not in out.info
    per_output = out.x.reshape(b, k, 2)
    for row in per_output:  # resampled copies parted ways through the SDE's noise
        assert len(torch.unique(row, dim=0)) == k
    torch.testing.assert_close(-objective(flow, out.x).float(), out.info["reward"])
    torch.testing.assert_close(out.info["reward"].reshape(b, k), out.info["rewards"])
    torch.testing.assert_close(out.info["weights"].sum(1), torch.ones(b))
    best = get_method("particles", particles=k, temperature=0.5)(
        flow, objective, num_steps=8, batch_size=b, progress=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(best.x, per_output[torch.arange(b), out.info["rewards"].argmax(1)].reshape(b, 2, 1, 1))


def test_the_add_potentials_final_weights_target_the_tilted_mixture():
    """K = 64 on the exact 2-D mixture, λ = 2, "add" resampling at steps 5, 10, 15: the population itself
    overshoots the tilted target p exp(λ r) (its share in the region: 0.55 against 0.46), and its final weights
    exp(λ (r - Σ G)) bring it back: cell TV to the exact target below 0.12 (0.05-0.08 measured over seeds),
    against above 0.25 unweighted. Weights exp(λ r) alone (no correction) leave it far off too."""
    flow, a, c = bench.mixture_problem()
    objective = CallableObjective(lambda x: -(x.flatten(1).double() @ a > c).to(x.dtype), space="latent")
    reference = bench.tilted_samples(flow, a, c, 2.0, 200_000, seed=7)
    exact = bench._cells(flow, reference, reference @ a > c)
    run = get_method("particles", particles=64, temperature=2.0, potential="add", every=5, select="all")
    weighted, plain, naive = torch.zeros(8, dtype=torch.float64), [], []
    for seed in (0, 1):
        out = run(flow, objective, num_steps=20, batch_size=64, progress=False,
                  generator=torch.Generator().manual_seed(seed))
        x = out.x.reshape(-1, 2).double()
        cells = F.one_hot(flow.prior.responsibilities(x).argmax(1) * 2 + (x @ a > c).long(), 8).double()
        weighted += (out.info["weights"].reshape(-1, 1).double() * cells).sum(0) / 128
        plain.append(cells)
        naive.append(torch.softmax(2.0 * out.info["rewards"].double(), -1).reshape(-1, 1) * cells / 64)

    def tv(d):
        return float(0.5 * (d - exact).abs().sum())

    assert tv(weighted) < 0.12, tv(weighted)
    assert tv(torch.cat(plain).mean(0)) > 0.25 and tv(torch.cat(naive).sum(0) / 2) > 0.25


# -- straight-through guidance: diversity --------------------------------------------------------------------
def test_diversity_spreads_straight_through_guidance_toward_the_tilted_posterior():
    """On the exact 81-sequence prior: gamma 2 alone collapses onto a few sequences; diversity = gamma (target
    p(x) p(y | x)) gives more distinct sequences, a higher entropy and a smaller total variation from the
    classifier-tilted posterior, at a lower mean score."""
    flow, classifier = sequences.exact_problem()
    objective = ClassifierObjective(classifier, 1, space="latent", num_classes=2)
    everything = torch.cartesian_prod(*[torch.arange(3)] * 4)
    place = 3 ** torch.arange(3, -1, -1)
    prior = flow.prior.log_prob(everything).exp()
    with torch.no_grad():
        score = classifier(F.one_hot(everything, 3).float()).softmax(1)[:, 1].double()
    tilted = prior * score / (prior * score).sum()
    found = {}
    for beta in (0.0, 2.0):
        out = get_method("straight_through", gamma=2.0, diversity=beta)(
            flow, objective, num_steps=20, batch_size=1000, progress=False, generator=torch.Generator().manual_seed(0))
        empirical = torch.bincount((out.info["tokens"] * place).sum(1), minlength=81).double() / 1000
        kept = empirical[empirical > 0]
        found[beta] = (int((empirical > 0).sum()), float(-(kept * kept.log()).sum()),
                       float(0.5 * (empirical - tilted).abs().sum()), float((empirical * score).sum()))
    (n0, h0, tv0, s0), (n2, h2, tv2, s2) = found[0.0], found[2.0]
    assert n2 >= 3 * n0 and h2 > h0 + 1.0, found
    assert tv2 < tv0 - 0.3 and tv2 < 0.4, found
    assert s2 < s0, found


@pytest.mark.parametrize("options, message", [
    ({"diversity": -1.0}, r"diversity \(β\) must be a number >= 0"),
    ({"diversity": 1.0, "gamma": 0.0}, "diversity=1.0 does nothing with gamma=0"),
    ({"diversity": 1.0, "source": "state"}, "use source='endpoint'"),
])
def test_bad_diversity_settings_are_named(options, message):
    flow, classifier = sequences.exact_problem()
    objective = ClassifierObjective(classifier, 1, space="latent", num_classes=2)
    with pytest.raises(ValueError, match=message):
        get_method("straight_through", **options)(flow, objective, num_steps=2, progress=False)
