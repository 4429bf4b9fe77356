"""Exactness of the analytic Gaussian-mixture flow: velocity, sampling, posteriors and EM fitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guidance.flow import euler_step, interpolate, x0_from_velocity
from guidance.analytic.gaussian_mixture import AnalyticGMMFlow, GaussianMixture, image_patches
from guidance.backbones.base import FlowModel

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# small linear (and one non-linear) operators, independent of the operators package
# ---------------------------------------------------------------------------------------------------
class MatrixOp(nn.Module):
    """y = M vec(x), returned as (B, m, 1, 1)."""

    is_linear = True

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.to(torch.float32))

    def forward(self, x):
        y = x.reshape(x.shape[0], -1) @ self.matrix.T
        return y.reshape(x.shape[0], -1, 1, 1)


class MaskOp(nn.Module):
    """Inpainting-like: y = mask * x (a diagonal 0/1 matrix)."""

    is_linear = True

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x):
        return x * self.mask


class AvgPoolOp(nn.Module):
    """Downsampling-like: 2x2 average pooling."""

    is_linear = True

    def forward(self, x):
        return F.avg_pool2d(x, 2)


class SquareOp(nn.Module):
    is_linear = False

    def forward(self, x):
        return x.square()


class AffineOp(nn.Module):
    """Claims linearity but adds an offset."""

    is_linear = True

    def forward(self, x):
        return x + 1.0


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: one intra-op thread is faster and immune to a busy machine's oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_spd(k: int, d: int, generator: torch.Generator, scale: float = 0.3, floor: float = 0.05) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=generator, dtype=F64) * scale
    return a @ a.transpose(-1, -2) + floor * torch.eye(d, dtype=F64)


def separated_flow() -> AnalyticGMMFlow:
    """Three well-separated components on 1x2x2 images."""
    g = torch.Generator().manual_seed(11)
    means = torch.tensor([[3.0, 0.0, 0.0, 0.0], [-3.0, 0.0, 1.0, 0.0], [0.0, 3.0, -2.0, 1.0]], dtype=F64)
    return AnalyticGMMFlow(torch.tensor([0.2, 0.3, 0.5]), means, random_spd(3, 4, g), shape=(1, 2, 2))


def planar_flow() -> AnalyticGMMFlow:
    """A 2-D mixture with correlated, unequal components, on shape (2, 1, 1)."""
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    means = torch.tensor([[-1.5, 0.0], [1.5, 1.0], [0.0, -2.0]], dtype=F64)
    covs = torch.tensor(
        [[[0.5, 0.2], [0.2, 0.3]], [[0.3, -0.1], [-0.1, 0.6]], [[0.2, 0.0], [0.0, 0.1]]], dtype=F64
    )
    return AnalyticGMMFlow(weights, means, covs, shape=(2, 1, 1))


def image_flow() -> AnalyticGMMFlow:
    """Three components on 1x4x4 images with smooth, strongly correlated covariances."""
    g = torch.Generator().manual_seed(5)
    coords = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    dist2 = torch.cdist(coords, coords).square().to(F64)
    covs = []
    for length, amp in [(1.0, 0.3), (2.0, 0.2), (0.7, 0.4)]:
        covs.append(amp * torch.exp(-dist2 / (2 * length**2)) + 1e-3 * torch.eye(16, dtype=F64))
    means = torch.randn(3, 16, generator=g, dtype=F64) * 0.6
    return AnalyticGMMFlow(torch.tensor([0.3, 0.45, 0.25]), means, torch.stack(covs), shape=(1, 4, 4))


def euler_sample(model: FlowModel, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    sigmas = model.sigmas(num_steps).to(noise.dtype)
    x = noise
    for i in range(num_steps):
        x = euler_step(x, model.velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


# ---------------------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------------------
def test_model_interface():
    model = separated_flow()
    assert isinstance(model, FlowModel)
    assert (model.image_channels, model.spatial_factor, model.size_multiple) == (1, 1, 1)
    s = model.sigmas(4)
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert model.latent_shape(2, 2) == (1, 2, 2) and model.default_size == (2, 2)
    img = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decode(model.encode(img)), img)
    with pytest.raises(ValueError, match="2x2 images only"):
        model.latent_shape(4, 2)
    with pytest.raises(ValueError, match="2x2 images only"):
        model.sigmas(10, height=8, width=8)


def test_euler_sampling_reproduces_prior():
    model = separated_flow()
    n = 4000
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = euler_sample(model, noise, 200).reshape(n, -1)

    mean, cov = model.prior.mean().reshape(-1), model.prior.covariance()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all(), (x.mean(0), mean)

    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.std(0) / math.sqrt(n)
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov + 1e-3).all(), (torch.cov(x.T), cov)

    # nearest component by log-density = responsibilities at s = 0
    assign = model.responsibilities(x.reshape(n, 1, 2, 2), 0.0).argmax(-1)
    fractions = torch.bincount(assign, minlength=3).to(F64) / n
    assert (fractions - model.weights).abs().max() < 0.03, fractions

    # a wrong velocity (the x0 estimate of the wrong time) visibly fails the same check
    class Lagged(FlowModel):
        def sigmas(self, num_steps, height=None, width=None):
            return model.sigmas(num_steps)

        def velocity(self, x, sigma, cond=None):
            return model.velocity(x, sigma * 0.7)

    wrong = euler_sample(Lagged(), noise[:1000], 100).reshape(1000, -1)
    assert (torch.cov(wrong.T) - cov).abs().max() > 20 * se_cov.max()


def test_velocity_endpoints_consistency_and_dtypes():
    model = separated_flow()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 2, 2, generator=g, dtype=F64)

    # s = 0: E[eps | x0] = 0, so v = -x exactly; s = 1: v = x - E[x0]
    torch.testing.assert_close(model.velocity(x, 0.0), -x, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.velocity(x, 1e-10), -x, rtol=0, atol=1e-8)
    torch.testing.assert_close(model.velocity(x, 1.0), x - model.prior.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.x0_hat(x, 1.0), model.prior.mean().expand_as(x), rtol=0, atol=1e-12)

    # x0_hat = x - s v at every time, including per-sample sigma
    sig = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0], dtype=F64)
    v = model.velocity(x, sig)
    torch.testing.assert_close(x0_from_velocity(x, v, sig), model.x0_hat(x, sig), rtol=0, atol=1e-12)
    for i in range(6):
        torch.testing.assert_close(v[i : i + 1], model.velocity(x[i : i + 1], float(sig[i])), rtol=0, atol=1e-13)

    # the direct closed form (x - x0_hat) / s agrees where it is well conditioned
    torch.testing.assert_close(v[2:], (x[2:] - model.x0_hat(x[2:], sig[2:])) / sig[2:].reshape(-1, 1, 1, 1))

    # dtype is preserved at the boundary; float32 results agree with float64 ones
    v32 = model.velocity(x.float(), sig.float())
    assert v32.dtype == torch.float32 and model.x0_hat(x.float(), 0.4).dtype == torch.float32
    torch.testing.assert_close(v32.double(), v, rtol=1e-5, atol=1e-5)


def test_velocity_gradients():
    """grad=True gives a differentiable field (checked against finite differences); grad=False gives none."""
    model = planar_flow()
    x = torch.tensor([[0.3, -0.2], [-1.0, 0.5], [1.2, 1.4]], dtype=F64).reshape(3, 2, 1, 1).requires_grad_(True)
    sig = torch.tensor([0.0, 0.4, 0.9], dtype=F64)
    assert torch.autograd.gradcheck(lambda t: model.velocity(t, sig, grad=True), (x,))
    assert torch.autograd.gradcheck(lambda t: model.x0_hat(t, sig, grad=True), (x,))
    assert model.velocity(x, sig).grad_fn is None and model.x0_hat(x, sig).grad_fn is None


def test_velocity_is_the_conditional_expectation():
    """v(x_s) = E[eps - x0 | x_s]: the residual of the regression target is orthogonal to functions of x_s."""
    model = separated_flow()
    g = torch.Generator().manual_seed(15)
    n = 40_000
    x0 = model.prior.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    for s in (0.2, 0.6):
        xs = interpolate(x0, eps, s)
        resid = ((eps - x0) - model.velocity(xs, s)).reshape(n, -1)
        feats = torch.cat([torch.ones(n, 1, dtype=F64), xs.reshape(n, -1)], 1)
        moments = resid[:, :, None] * feats[:, None, :]
        se = moments.std(0) / math.sqrt(n)
        assert (moments.mean(0).abs() < 5 * se).all(), s
        # a slightly wrong field is detected by the same statistic
        wrong = ((eps - x0) - model.velocity(xs, s * 0.7)).reshape(n, -1)
        assert ((wrong[:, :, None] * feats[:, None, :]).mean(0).abs() > 8 * se).any(), s


def test_x0_hat_matches_brute_force_posterior_mean():
    """E[x0 | x_s = x] by importance weighting of prior samples with N(x; (1 - s) x0, s^2 I)."""
    model = planar_flow()
    g = torch.Generator().manual_seed(3)
    x0 = model.prior.sample(400_000, g)
    for s in (0.35, 0.7):
        x = torch.tensor([[0.2, 0.1], [-0.9, -0.4], [0.5, -1.0]], dtype=F64).reshape(3, 2, 1, 1)
        exact = model.x0_hat(x, s)
        for i in range(3):
            logw = -(x[i] - (1 - s) * x0).reshape(len(x0), -1).square().sum(-1) / (2 * s**2)
            w = torch.softmax(logw, 0)
            est = (w[:, None] * x0.reshape(len(x0), -1)).sum(0)
            ess = 1 / w.square().sum()
            spread = ((w[:, None] * (x0.reshape(len(x0), -1) - est).square()).sum(0) / ess).sqrt()
            assert ((est - exact[i].reshape(-1)).abs() < 5 * spread + 1e-4).all(), (s, i, est, exact[i])


@pytest.mark.parametrize("s", [0.15, 0.5, 0.85])
def test_velocity_satisfies_continuity_equation(s):
    """d p_s / ds + div(p_s v_s) = 0 with p_s the exact marginal mixture, by central differences."""
    model = planar_flow()
    pts = torch.tensor([[0.3, -0.2], [-1.0, 0.5], [1.2, 1.4], [0.1, -1.6]], dtype=F64)
    h = 1e-5

    def density(x, sig):
        return model.marginal(sig).log_prob(x).exp()

    dp_ds = (density(pts, s + h) - density(pts, s - h)) / (2 * h)
    div = torch.zeros(len(pts), dtype=F64)
    for i in range(2):
        e = torch.zeros(2, dtype=F64)
        e[i] = h
        flux = []
        for x in (pts + e, pts - e):
            flux.append(density(x, s) * model.velocity(x.reshape(-1, 2, 1, 1), s).reshape(-1, 2)[:, i])
        div += (flux[0] - flux[1]) / (2 * h)
    scale = dp_ds.abs() + div.abs()
    assert (scale > 1e-3).all()
    assert ((dp_ds + div).abs() <= 1e-4 * scale).all(), (dp_ds, div)
    # the sign of the time derivative matters: the reversed flow fails
    assert ((-dp_ds + div).abs() > 1e-2 * scale).any()


# ---------------------------------------------------------------------------------------------------
# the mixture class
# ---------------------------------------------------------------------------------------------------
def test_mixture_log_prob_sampling_and_moments():
    model = image_flow()
    prior = model.prior
    g = torch.Generator().manual_seed(4)
    x, comp = prior.sample(20_000, g, return_components=True)
    assert x.shape == (20_000, 1, 4, 4) and x.dtype == F64
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=prior.weights),
        torch.distributions.MultivariateNormal(prior.means, covariance_matrix=prior.covariances),
    )
    torch.testing.assert_close(prior.log_prob(x[:50]), ref.log_prob(x[:50].reshape(50, -1)))
    torch.testing.assert_close(model.log_prob(x[:50].float()), ref.log_prob(x[:50].reshape(50, -1).float().double()))
    fractions = torch.bincount(comp, minlength=3).to(F64) / len(comp)
    assert (fractions - prior.weights).abs().max() < 0.02
    flat = x.reshape(len(x), -1)
    se = (torch.diagonal(prior.covariance()) / len(x)).sqrt()
    assert ((flat.mean(0) - prior.mean().reshape(-1)).abs() < 5 * se).all()
    assert (torch.cov(flat.T) - prior.covariance()).abs().max() < 0.03
    # same generator state, same samples
    a = prior.sample(5, torch.Generator().manual_seed(9))
    b = prior.sample(5, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert model.sample_prior(5, torch.Generator().manual_seed(9)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# exact posteriors
# ---------------------------------------------------------------------------------------------------
def test_posterior_matches_importance_sampling_2d():
    model = planar_flow()
    op = MatrixOp(torch.tensor([[1.0, 0.5]]))
    noise_std = 0.4
    y = torch.tensor([[[[0.1]]]])  # between the modes: several components keep mass
    post = model.posterior(op, y, noise_std)
    assert isinstance(post, GaussianMixture) and post.shape == (2, 1, 1)
    assert (post.weights > 0.02).sum() >= 2

    g = torch.Generator().manual_seed(6)
    x0, comp = model.prior.sample(400_000, g, return_components=True)
    flat = x0.reshape(len(x0), 2)
    logw = -(y.reshape(1) - flat @ torch.tensor([1.0, 0.5], dtype=F64)).square() / (2 * noise_std**2)
    w = torch.softmax(logw, 0)
    ess = float(1 / w.square().sum())
    assert ess > 10_000

    is_mean = (w[:, None] * flat).sum(0)
    centred = flat - is_mean
    is_cov = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
    is_weights = torch.zeros(3, dtype=F64).index_add_(0, comp, w)

    exact_cov = post.covariance()
    se_mean = (torch.diagonal(exact_cov) / ess).sqrt()
    assert ((is_mean - post.mean().reshape(-1)).abs() < 5 * se_mean).all(), (is_mean, post.mean())
    se_cov = (torch.diagonal(exact_cov)[:, None] * torch.diagonal(exact_cov)[None, :] * 2 / ess).sqrt()
    assert ((is_cov - exact_cov).abs() < 5 * se_cov).all(), (is_cov, exact_cov)
    se_w = (post.weights * (1 - post.weights) / ess).sqrt()
    assert ((is_weights - post.weights).abs() < 5 * se_w + 1e-4).all(), (is_weights, post.weights)


def _information_form(prior_mean, prior_cov, a, y, noise_std):
    """Posterior of one Gaussian component via precisions: P' = P + A^T A / s^2, mu' = P'^{-1}(P mu + A^T y / s^2)."""
    prec = torch.linalg.inv(prior_cov) + a.T @ a / noise_std**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (torch.linalg.solve(prior_cov, prior_mean) + a.T @ y / noise_std**2)
    return mean, cov


def _log_normal(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


@pytest.mark.parametrize("kind", ["inpaint", "downsample"])
def test_posterior_for_image_operators(kind):
    model = image_flow()
    if kind == "inpaint":
        mask = torch.ones(1, 1, 4, 4)
        mask[..., 1:3, 1:4] = 0.0
        op = MaskOp(mask)
    else:
        op = AvgPoolOp()
    g = torch.Generator().manual_seed(7)
    a = model.measurement_matrix(op)
    assert a.shape == ((16, 16) if kind == "inpaint" else (4, 16))

    # near-noiseless: the posterior mean reproduces the measurement
    x_true = model.sample_prior(1, g, dtype=F64)
    tiny = 1e-3
    y = op(x_true.float()).double() + tiny * torch.randn(op(x_true).shape, generator=g, dtype=F64)
    post = model.posterior(op, y, tiny)
    a_mean = op(post.mean()[None].float()).double()
    assert (a_mean - y).abs().max() < 5e-3
    assert (op(model.prior.mean()[None].float()).double() - y).abs().max() > 0.1

    # moderate noise: per-component formulas agree with the information form, weights with Bayes' rule
    noise_std = 0.1
    y = op(x_true.float()).double() + noise_std * torch.randn(y.shape, generator=g, dtype=F64)
    post = model.posterior(op, y, noise_std)
    yv = y.reshape(-1)
    probe = torch.zeros(16, dtype=F64)
    log_evidence = []
    for k in range(3):
        mean_k, cov_k = _information_form(model.means[k], model.covariances[k], a, yv, noise_std)
        torch.testing.assert_close(post.means[k], mean_k, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(post.covariances[k], cov_k, rtol=1e-6, atol=1e-9)
        # p(y | k) = p(x | k) p(y | x) / p(x | y, k) at any x
        lik = _log_normal(yv, a @ probe, noise_std**2 * torch.eye(len(yv), dtype=F64))
        prior_k = _log_normal(probe, model.means[k], model.covariances[k])
        log_evidence.append(prior_k + lik - _log_normal(probe, mean_k, cov_k))
    weights = torch.softmax(torch.log(model.weights) + torch.stack(log_evidence), 0)
    torch.testing.assert_close(post.weights, weights, rtol=1e-6, atol=1e-10)

    # posterior log_prob equals a direct mixture density; samples have the mixture's moments
    xs, comp = post.sample(20_000, g, return_components=True)
    probes = xs[:100].reshape(100, -1)
    direct = torch.logsumexp(
        torch.stack([w.log() + _log_normal(probes, m, c) for w, m, c in zip(post.weights, post.means, post.covariances)]),
        0,
    )
    torch.testing.assert_close(post.log_prob(xs[:100]), direct, rtol=1e-9, atol=1e-9)
    flat = xs.reshape(len(xs), -1)
    se = (torch.diagonal(post.covariance()) / len(xs)).sqrt()
    assert ((flat.mean(0) - post.mean().reshape(-1)).abs() < 5 * se).all()
    centred = flat - flat.mean(0)
    se_cov = (centred[:, :, None] * centred[:, None, :]).std(0) / math.sqrt(len(xs))
    assert ((torch.cov(flat.T) - post.covariance()).abs() < 5 * se_cov + 1e-6).all()
    fractions = torch.bincount(comp, minlength=3).to(F64) / len(comp)
    assert (fractions - post.weights).abs().max() < 0.02


def test_posteriors_batch_matches_single():
    model = image_flow()
    op = AvgPoolOp()
    g = torch.Generator().manual_seed(8)
    y = op(model.sample_prior(2, g)) + 0.05 * torch.randn(2, 1, 2, 2, generator=g)
    both = model.posteriors(op, y, 0.05)
    assert len(both) == 2
    for i in range(2):
        one = model.posterior(op, y[i : i + 1], 0.05)
        torch.testing.assert_close(both[i].weights, one.weights)
        torch.testing.assert_close(both[i].means, one.means)
    with pytest.raises(ValueError, match="use posteriors"):
        model.posterior(op, y, 0.05)


def test_posterior_flow_samples_the_posterior():
    """The flow of the exact posterior, integrated by Euler, lands on the posterior's modes."""
    model = planar_flow()
    post = model.posterior(MatrixOp(torch.tensor([[1.0, 0.5]])), torch.tensor([[[[0.1]]]]), 0.4)
    flow = AnalyticGMMFlow.from_mixture(post)
    x = euler_sample(flow, torch.randn(3000, 2, 1, 1, generator=torch.Generator().manual_seed(12), dtype=F64), 100)
    se = (torch.diagonal(post.covariance()) / 3000).sqrt()
    assert ((x.reshape(-1, 2).mean(0) - post.mean().reshape(-1)).abs() < 5 * se).all()


# ---------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------
def test_fit_recovers_known_mixture():
    truth = planar_flow()
    g = torch.Generator().manual_seed(13)
    data = truth.prior.sample(4000, g)
    fitted = AnalyticGMMFlow.fit(data, 3, generator=torch.Generator().manual_seed(0), iters=200)
    assert fitted.shape == (2, 1, 1)
    # match components by nearest mean
    order = torch.cdist(truth.means, fitted.means).argmin(-1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert (fitted.weights[order] - truth.weights).abs().max() < 0.03
    assert (fitted.means[order] - truth.means).abs().max() < 0.1
    assert (fitted.covariances[order] - truth.covariances).abs().max() < 0.08


def test_fit_on_natural_image_patches():
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.color import rgb2gray

    images = []
    for name in ("camera", "astronaut", "coffee", "chelsea"):
        img = torch.from_numpy(getattr(skimage_data, name)()).to(F64)
        if img.ndim == 3:
            img = torch.from_numpy(rgb2gray(img.numpy() / 255.0)) * 255.0
        images.append(img / 127.5 - 1.0)
    g = torch.Generator().manual_seed(14)
    patches = image_patches(images, 8, 5000, g)
    assert patches.shape == (5000, 1, 8, 8)
    assert patches.min() >= -1 and patches.max() <= 1
    train, held_out = patches[:4000], patches[4000:]

    mixture = AnalyticGMMFlow.fit(train, 4, generator=torch.Generator().manual_seed(1), iters=40, reg=1e-4)
    single = AnalyticGMMFlow.fit(train, 1, generator=torch.Generator().manual_seed(1), iters=5, reg=1e-4)
    assert mixture.shape == (1, 8, 8) and mixture.n_components == 4
    assert (torch.linalg.eigvalsh(mixture.covariances) > 0).all()
    assert torch.isfinite(mixture.log_prob(held_out)).all()
    assert mixture.log_prob(held_out).mean() > single.log_prob(held_out).mean() + 5.0
    # the fitted model is a working flow
    v = mixture.velocity(held_out[:8].float(), 0.5)
    assert v.shape == (8, 1, 8, 8) and torch.isfinite(v).all()


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_rejects_wrong_means_shape():
    with pytest.raises(ValueError, match="d = 4 elements"):
        AnalyticGMMFlow(torch.ones(2) / 2, torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3), shape=(1, 2, 2))


def test_rejects_wrong_covariance_shape():
    with pytest.raises(ValueError, match=r"covariances must have shape \(K, d, d\) = \(2, 4, 4\)"):
        AnalyticGMMFlow(torch.ones(2) / 2, torch.zeros(2, 4), torch.eye(4), shape=(1, 2, 2))


def test_rejects_non_positive_definite_covariance():
    covs = torch.eye(2, dtype=F64).repeat(2, 1, 1)
    covs[1] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"components \[1\] are not positive definite"):
        AnalyticGMMFlow(torch.ones(2) / 2, torch.zeros(2, 2), covs, shape=(2, 1, 1))


def test_rejects_non_linear_operator():
    model = image_flow()
    y = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="linear operator"):
        model.posterior(SquareOp(), y, 0.1)
    with pytest.raises(ValueError, match="affine"):
        model.posterior(AffineOp(), y, 0.1)


def test_rejects_measurement_shape_mismatch():
    model = image_flow()
    with pytest.raises(ValueError, match=r"y must have shape \(B, 1, 2, 2\)"):
        model.posterior(AvgPoolOp(), torch.zeros(1, 1, 4, 4), 0.1)


def test_rejects_bad_weights_sigma_and_noise():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    model = separated_flow()
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        model.velocity(torch.zeros(2, 1, 2, 2), 1.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 2, 2\)"):
        model.velocity(torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="noise_std must be a positive number"):
        image_flow().posterior(AvgPoolOp(), torch.zeros(1, 1, 2, 2), 0.0)
