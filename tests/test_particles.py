"""The flow's SDE sampler and particle search: exact marginals, resampling, NFE parity, the search beats best-of-N."""

import json
import re

import pytest
import torch

from guidance import AnalyticGMMFlow, CallableObjective, get_method, sample
from guidance.methods.particles import ancestors
from guidance.sde import sde_step
from tasks.studies import particle_benchmark as bench
from tasks.commands.design import load_score, load_sequence_flow


def gmm_flow() -> AnalyticGMMFlow:
    weights = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]], dtype=torch.float64)
    covariances = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), torch.tensor([[0.2, -0.05], [-0.05, 0.4]]),
                               0.1 * torch.eye(2)]).double()
    return AnalyticGMMFlow(weights, means.reshape(3, 2, 1, 1), covariances, (2, 1, 1))


def trajectory(flow, n: int, steps: int, eta: float, seed: int = 1) -> dict[int, tuple[float, torch.Tensor]]:
    """The SDE sampler's state after every step: step -> (s, (n, 2) samples)."""
    seen = {}

    def keep(i, s, state):
        seen[i] = (float(s), state["x"].reshape(n, -1).double())
        return state

    sample(flow, num_steps=steps, batch_size=n, generator=torch.Generator().manual_seed(seed), progress=False,
           stochastic=True, noise_scale=eta, on_step_end=keep)
    return seen


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 4.0])
def test_the_sde_keeps_the_exact_marginals_at_every_s(eta):
    flow, n, steps = gmm_flow(), 4000, 50
    seen = trajectory(flow, n, steps, eta)
    for i in (12, 24, 37, 49):  # s = 0.74, 0.5, 0.24, 0
        s, x = seen[i]
        exact = flow.marginal(s)
        mean, cov = exact.mean().reshape(-1), exact.covariance()
        reference = exact.sample(n, torch.Generator().manual_seed(100 + i)).reshape(n, -1).double()
        floor = bench.sliced_w2(reference, exact.sample(n, torch.Generator().manual_seed(200 + i)).reshape(n, -1))
        assert (x.mean(0) - mean).norm() < 4 * (cov.trace() / n).sqrt() + 0.01, (eta, s)
        assert (torch.cov(x.T) - cov).norm() / cov.norm() < 0.08, (eta, s)
        assert bench.sliced_w2(x, reference) < 2 * floor + 0.02, (eta, s)


def test_an_sde_without_its_score_drift_leaves_the_marginals():
    """The check above can fail: dropping the η eps_hat drift (noise only) inflates the final covariance."""
    flow, n = gmm_flow(), 4000
    sigmas, x = flow.sigmas(50), torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for i in range(50):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = flow.velocity(x, s)
        x = sde_step(x, v, s, s_next, 1.0, generator) - (s_next - s) * (x + (1 - s) * v)  # undo the drift
    cov = flow.marginal(0.0).covariance()
    assert (torch.cov(x.reshape(n, 2).double().T) - cov).norm() / cov.norm() > 0.3


def test_the_simplex_sde_lands_closer_to_the_exact_categorical_prior_than_the_ode():
    """Sequences: the re-noising step (guidance.sde.simplex_step) keeps the path's marginals; on an exact categorical
    prior (all 3⁴ sequences enumerated) its final distribution is closer to the prior than the deterministic
    sampler's, whose error comes from the Gumbel-softmax path itself (TV 0.19 at 40 or 200 steps)."""
    import itertools

    from guidance import AnalyticSimplexFlow, CategoricalMixture
    from guidance.sde import simplex_step

    prior = CategoricalMixture.random(2, 4, 3, generator=torch.Generator().manual_seed(3))
    flow, n, steps = AnalyticSimplexFlow(prior), 8000, 40
    every = torch.tensor(list(itertools.product(range(3), repeat=4)))
    exact = prior.log_prob(every).exp()
    place = torch.tensor([27, 9, 3, 1])

    def tv_to_prior(eta: float) -> float:
        g = torch.Generator().manual_seed(1)
        sigmas, x = flow.sigmas(steps), flow.initial_state(n, g)
        for i in range(steps):
            x = simplex_step(flow, x, flow.velocity(x, sigmas[i]), flow.endpoint(x, sigmas[i]), sigmas[i],
                             sigmas[i + 1], eta, g)
        found = torch.bincount((flow.tokens(x) * place).sum(1), minlength=len(every)).double() / n
        return 0.5 * float((found - exact).abs().sum())

    ode, sde = tv_to_prior(0.0), tv_to_prior(4.0)
    assert sde < 0.75 * ode, (sde, ode)


def test_the_sde_sampler_needs_a_generator_and_reproduces_with_one():
    flow = gmm_flow()
    with pytest.raises(ValueError, match="pass an explicit generator"):
        sample(flow, num_steps=4, batch_size=2, progress=False, stochastic=True)
    with pytest.raises(ValueError, match="noise_scale"):
        sample(flow, num_steps=4, batch_size=2, progress=False, stochastic=True, noise_scale=-1.0,
               generator=torch.Generator().manual_seed(0))
    runs = [sample(flow, num_steps=6, batch_size=3, progress=False, stochastic=True,
                   generator=torch.Generator().manual_seed(s)).x for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    ode = sample(flow, num_steps=6, batch_size=3, progress=False, generator=torch.Generator().manual_seed(0)).x
    zero = sample(flow, num_steps=6, batch_size=3, progress=False, stochastic=True, noise_scale=0.0,
                  generator=torch.Generator().manual_seed(0)).x
    assert torch.equal(ode, zero) and not torch.equal(ode, runs[0])


@pytest.mark.parametrize("resampler", ["systematic", "multinomial"])
def test_resampling_keeps_each_particle_k_w_times_in_expectation(resampler):
    w = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    rows = 4000
    a = ancestors(w.log().expand(rows, -1), resampler, torch.Generator().manual_seed(0))
    counts = torch.nn.functional.one_hot(a, 5).sum(1).double()  # (rows, K)
    expected = 5 * w
    torch.testing.assert_close(counts.mean(0), expected, atol=0.05, rtol=0)
    if resampler == "systematic":  # floor(K w) or ceil(K w) copies, every time
        assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all())
    else:
        assert bool((counts.var(0) > 0.5 * 5 * w * (1 - w)).all())  # multinomial spread


def test_systematic_resampling_is_deterministic_for_exact_multiples():
    """Weights that are multiples of 1/K: exactly K w_k copies of particle k, whatever u."""
    log_w = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25]], dtype=torch.float64)).expand(50, -1)
    a = ancestors(log_w, "systematic", torch.Generator().manual_seed(3))
    assert a.tolist() == [[0, 0, 2, 3]] * 50


def indicator_problem():
    flow, a, c = bench.mixture_problem()
    objective = CallableObjective(lambda x: -(x.flatten(1).double() @ a > c).to(x.dtype), space="latent")
    return flow, a, c, objective


def test_particles_and_best_of_n_spend_the_same_nfe():
    flow, a, c, objective = indicator_problem()
    outs = [get_method(m, **o)(flow, objective, num_steps=7, batch_size=3, progress=False,
                               generator=torch.Generator().manual_seed(0))
            for m, o in (("best_of_n", {"candidates": 5}), ("particles", {"particles": 5, "every": 2}))]
    assert outs[0].nfe == outs[1].nfe == 35
    info = outs[1].info
    assert info["resampling_steps"] == [2, 4] and info["objective_calls"] == 5 * 3
    assert info["ess"].shape == (2, 3) and bool(((info["ess"] >= 1 - 1e-6) & (info["ess"] <= 5 + 1e-6)).all())
    assert info["rewards"].shape == (3, 5) and info["ancestry"].shape == (3, 5)
    torch.testing.assert_close(info["reward"], info["rewards"].max(1).values)
    assert outs[1].x.shape == (3, 2, 1, 1)
    torch.testing.assert_close(-objective(flow, outs[1].x).float(), info["reward"])  # the returned particles


def test_particles_beat_best_of_n_on_the_exact_mixture():
    """At equal NFE, more outputs in the rewarded region and closer to the exact tilted target (cell TV)."""
    rows, target = bench.mixture_rows(256, 8, 20, 10.0, {}, seed=0)
    by = {r.method.split(" ")[0] + (" sample" if "sample" in r.method else ""): r for r in rows}
    best, particles = by["best_of_n"], by["particles"]
    assert particles.nfe == best.nfe
    assert particles.reward > best.reward + 0.15, (particles, best)
    assert particles.cell_tv < best.cell_tv - 0.15 and particles.distance < best.distance
    assert by["particles sample"].reward > best.reward + 0.1
    assert target["reward"] > 0.99 and abs(sum(target["mode_weights"]) - 1) < 1e-3


def test_particles_beat_best_of_n_on_the_exact_categorical_prior():
    rows, target = bench.sequence_rows(256, 8, 20, 10.0, {}, seed=0, motif="GAT")
    by = {r.method.split(" ")[0]: r for r in rows if "sample" not in r.method}
    best, particles = by["best_of_n"], by["particles"]
    assert particles.nfe == best.nfe
    assert particles.reward > best.reward + 0.08, (particles, best)
    assert particles.cell_tv < best.cell_tv and particles.distance < best.distance


def test_particles_on_a_simplex_flow_with_a_gradient_step():
    flow = load_sequence_flow("analytic:length=8", 4)
    score = load_score("motif:GAT", "ACGT")
    objective = CallableObjective(lambda h: -score(h), space="latent")
    run = get_method("particles", particles=4, step_size=2.0)
    out = run(flow, objective, num_steps=10, batch_size=6, progress=False, generator=torch.Generator().manual_seed(0))
    assert out.info["tokens"].shape == (6, 8) and out.nfe == 40 and out.image is None
    assert out.info["objective_calls"] == 4 * 9 + 4 * 8 + 4  # gradient steps, resamplings, final scores
    hard = torch.nn.functional.one_hot(out.info["tokens"], 4).float()
    torch.testing.assert_close(score(hard), out.info["reward"])


def test_particles_on_the_default_image_model_with_a_hard_decision():
    from guidance import DecisionObjective, load_model
    from guidance.features.rewards import classifier_source, load_classifier

    model = load_model("default")
    classifier = load_classifier(classifier_source("default"))
    objective = DecisionObjective(classifier.logits, 0, num_classes=classifier.num_classes)
    out = get_method("particles", particles=2)(model, objective, num_steps=3, batch_size=1, progress=False,
                                               generator=torch.Generator().manual_seed(0))
    assert out.image.shape[:2] == (1, 3) and out.nfe == 6
    with torch.no_grad():
        decided = float(classifier.logits(out.image).argmax(1)[0] == 0)
    assert out.info["reward"].tolist() == [decided]


def test_particles_reproduce_with_a_seed_and_differ_across_seeds():
    flow, _, _, objective = indicator_problem()
    run = get_method("particles", particles=4, resampler="multinomial", select="sample")
    xs = [run(flow, objective, num_steps=6, batch_size=8, progress=False,
              generator=torch.Generator().manual_seed(s)).x for s in (0, 0, 1)]
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[0], xs[2])


@pytest.mark.parametrize("options, message", [
    ({"particles": 0}, r"particles \(K\) must be an integer >= 1"),
    ({"every": 0}, r"every .* must be an integer >= 1"),
    ({"resampler": "stratified"}, "resampler must be one of 'systematic', 'multinomial'"),
    ({"potential": "sum"}, "potential must be one of"),
    ({"select": "first"}, "select must be one of"),
    ({"noise_scale": -1.0}, "noise_scale"),
    ({"temperature": -1.0}, "temperature"),
    ({"ess_threshold": 0.0}, r"ess_threshold must be a number in \(0, 1\] .* got 0.0"),
    ({"ess_threshold": 1.5}, r"ess_threshold must be a number in \(0, 1\] .* got 1.5"),
    ({"ess_threshold": True}, "ess_threshold must be a finite number, got True"),
    ({"ess_threshold": 0.5, "particles": 1}, r"ess_threshold=0.5 chooses .* does nothing with particles=1: drop it"),
    ({"window": (0, 2), "particles": 1}, r"window=\(0, 2\) chooses .* does nothing with particles=1"),
    ({"ess_threshold": 0.5, "every": 5}, "ess_threshold=0.5 does nothing: 3 steps with every=5 leave no resampling"),
    ({"window": (2, 9)}, r"window \(2, 9\) lies outside .* need 0 <= start < stop <= 2"),
    ({"window": (1.0, 2)}, r"window must be a pair \(start, stop\) of step indices, got \(1.0, 2\)"),
])
def test_bad_options_are_named(options, message):
    flow, _, _, objective = indicator_problem()
    with pytest.raises(ValueError, match=message):
        get_method("particles", **options)(flow, objective, num_steps=3, progress=False,
                                           generator=torch.Generator().manual_seed(0))


def test_nan_rewards_and_missing_generator_are_refused():
    flow, _, _, _ = indicator_problem()
    nan = CallableObjective(lambda x: torch.full((x.shape[0],), float("nan")), space="latent")
    with pytest.raises(ValueError, match="NaN or infinite losses"):
        get_method("particles")(flow, nan, num_steps=4, progress=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="explicit generator"):
        get_method("particles")(flow, nan, num_steps=4, progress=False)


def test_cli_generate_with_particles(cli, tmp_path):
    out = tmp_path / "gen"
    code, printed, err = cli("generate", "--classifier", "default", "--label", "0", "--method", "particles",
                             "--option", "particles=2", "--steps", "3", "--quiet", "--out", out)
    assert code == 0, err
    assert re.search(r"particles: mean log p\(label\) .*; 6 NFE", printed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 6 and metrics["settings"]["options"]["particles"] == 2


def test_cli_design_with_particles_beats_best_of_n(cli, tmp_path):
    means = {}
    for method in ("particles", "best_of_n"):
        out = tmp_path / f"{method}.json"
        code, printed, err = cli("design", "--score", "motif:GAT", "--method", method, "--num", "32", "--quiet",
                                 "--steps", "20", "--out", out)
        assert code == 0, err
        means[method] = json.loads(out.read_text())["guided_mean"]
    assert "score of the particles per resampling" not in printed  # best_of_n ran last: no curve
    assert means["particles"] > means["best_of_n"] + 0.2, means
    code, _, err = cli("design", "--score", "motif:GAT", "--method", "particles", "--particles", "0", "--quiet")
    assert code == 2 and "particles (K) must be an integer >= 1" in err
