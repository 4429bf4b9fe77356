"""Analytic flows: a Gaussian-mixture prior whose velocity and posteriors are known exactly.

Prior ``p(x0) = sum_k pi_k N(mu_k, Sigma_k)`` over image-shaped tensors of small dimension
``d = C * H * W``. Under the toolkit's path ``x_s = (1 - s) x0 + s eps`` (``eps ~ N(0, I)``), the
marginal ``p_s`` is again a mixture, with component means ``m_k = (1 - s) mu_k`` and covariances
``C_k = (1 - s)^2 Sigma_k + s^2 I``. Everything a guided method needs follows in closed form:

* responsibilities ``r_k(x) = softmax_k(log pi_k + log N(x; m_k, C_k))``,
* per-component clean estimate ``E[x0 | x, k] = mu_k + (1 - s) Sigma_k C_k^{-1} (x - m_k)``,
* clean estimate ``x0_hat(x) = sum_k r_k E[x0 | x, k]`` and velocity ``v = (x - x0_hat) / s``,
* for a linear measurement ``y = A x0 + n``, ``n ~ N(0, sigma_n^2 I)``, the posterior, again a mixture:
  ``S_k = A Sigma_k A^T + sigma_n^2 I``, ``pi'_k ∝ pi_k N(y; A mu_k, S_k)``,
  ``G_k = Sigma_k A^T S_k^{-1}``, ``mu'_k = mu_k + G_k (y - A mu_k)``, ``Sigma'_k = Sigma_k - G_k A Sigma_k``.

All arithmetic is float64. :class:`GaussianMixture` holds the density, sampling and EM code once; the prior,
the time-``s`` marginals and the posteriors are all instances of it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..flow import expand_sigma
from ..backbones.base import FlowModel, check_num_steps, to_arguments

__all__ = ["GaussianMixture", "AnalyticGMMFlow", "image_patches"]

_F64 = torch.float64
_LOG_2PI = math.log(2 * math.pi)


def _batched(shape: Sequence[int], batch: str = "B") -> str:
    return "(" + ", ".join([batch, *map(str, shape)]) + ")"


def _as_f64(value: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except Exception as exc:  # pragma: no cover - torch's own message is kept
        raise ValueError(f"{name} must be a tensor or array of numbers: {exc}") from exc
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    t = t.to(dtype=_F64, device=device if device is not None else t.device)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


class GaussianMixture:
    """A finite Gaussian mixture ``sum_k pi_k N(mu_k, Sigma_k)`` in float64, with an optional event shape.

    Args:
        weights: ``(K,)`` non-negative mixture weights summing to 1.
        means: ``(K, d)`` component means.
        covariances: ``(K, d, d)`` symmetric positive-definite component covariances.
        shape: event shape with ``prod(shape) == d`` (e.g. ``(C, H, W)``); samples come back as
            ``(n, *shape)`` and :meth:`log_prob` accepts ``(N, *shape)`` or ``(N, d)``. Defaults to ``(d,)``.

    Each covariance is factored once, ``Sigma_k = L_k L_k^T`` (Cholesky); densities use triangular solves
    ``z = L_k^{-1} (x - mu_k)``, ``log N = -(|z|^2 + 2 sum log diag L_k + d log 2 pi) / 2``, and sampling uses
    ``x = mu_k + L_k eps``. No matrix is ever inverted explicitly. Log-densities are always returned in float64.
    """

    def __init__(
        self,
        weights: Any,
        means: Any,
        covariances: Any,
        shape: Sequence[int] | None = None,
    ) -> None:
        means = _as_f64(means, "means")
        device = means.device
        weights = _as_f64(weights, "weights", device)
        covariances = _as_f64(covariances, "covariances", device)
        if means.ndim != 2:
            raise ValueError(
                f"means must have shape (K, d) = (components, dimension), got {tuple(means.shape)}; "
                "flatten image-shaped means with means.reshape(K, -1)"
            )
        k, d = means.shape
        if k < 1 or d < 1:
            raise ValueError(f"means must have at least one component and one dimension, got {tuple(means.shape)}")
        if weights.shape != (k,):
            raise ValueError(
                f"weights must have shape (K,) = ({k},) to match means {tuple(means.shape)}, "
                f"got {tuple(weights.shape)}"
            )
        if covariances.shape != (k, d, d):
            raise ValueError(
                f"covariances must have shape (K, d, d) = ({k}, {d}, {d}) to match means {tuple(means.shape)}, "
                f"got {tuple(covariances.shape)}"
            )
        if (weights < 0).any():
            raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(
                f"weights must sum to 1, got sum {float(weights.sum()):.8g}; divide them by their sum first"
            )
        weights = weights / weights.sum()  # exact normalisation in float64 (inputs may be float32)
        scale = covariances.abs().amax(dim=(-2, -1)).clamp_min(1e-300)
        asym = (covariances - covariances.transpose(-1, -2)).abs().amax(dim=(-2, -1))
        bad = (asym > 1e-8 * scale).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"covariances of components {bad} are not symmetric (max |S - S^T| = {float(asym.max()):.3g}); "
                "pass (S + S^T) / 2"
            )
        covariances = 0.5 * (covariances + covariances.transpose(-1, -2))
        chol, info = torch.linalg.cholesky_ex(covariances)
        bad = (info != 0).nonzero().flatten().tolist()
        if bad:
            min_eig = torch.linalg.eigvalsh(covariances[bad]).amin(dim=-1).tolist()
            raise ValueError(
                f"covariances of components {bad} are not positive definite (smallest eigenvalues "
                f"{[f'{e:.3g}' for e in min_eig]}); add a multiple of the identity, e.g. S + 1e-4 * I"
            )
        if shape is None:
            shape = (d,)
        shape = tuple(int(n) for n in shape)
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements but the mixture dimension is d = {d}")
        self.weights = weights
        self.means = means
        self.covariances = covariances
        self.cholesky = chol
        self.shape = shape
        self._log_weights = torch.log(weights)  # -inf for empty components, harmless in logsumexp
        self._half_log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    # -- basic properties -------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __repr__(self) -> str:
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim}, shape={self.shape})"

    def _flatten(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        if tuple(x.shape[1:]) == self.shape or (x.ndim == 2 and x.shape[1] == self.dim):
            return x.to(dtype=_F64, device=self.device).reshape(x.shape[0], self.dim)
        if tuple(x.shape) == self.shape:
            raise ValueError(f"x has the event shape {self.shape} but no batch dimension; pass x[None]")
        raise ValueError(f"x must have shape {_batched(self.shape, 'N')} or (N, {self.dim}), got {tuple(x.shape)}")

    # -- densities ----------------------------------------------------------------------------------
    def log_component(self, x: Any) -> torch.Tensor:
        """``(N, K)`` joint log-densities ``log pi_k + log N(x; mu_k, Sigma_k)``."""
        x = self._flatten(x)
        diff = x.T[None] - self.means[:, :, None]  # (K, d, N): one triangular solve per component
        z = torch.linalg.solve_triangular(self.cholesky, diff, upper=False)
        log_norm = -0.5 * (z.square().sum(-2).T + self.dim * _LOG_2PI) - self._half_log_det
        return self._log_weights + log_norm

    def log_prob(self, x: Any) -> torch.Tensor:
        """``(N,)`` mixture log-density ``log sum_k pi_k N(x; mu_k, Sigma_k)``, float64."""
        return torch.logsumexp(self.log_component(x), dim=-1)

    def responsibilities(self, x: Any) -> torch.Tensor:
        """``(N, K)`` posterior component probabilities ``p(k | x)`` (a softmax of :meth:`log_component`)."""
        return torch.softmax(self.log_component(x), dim=-1)

    # -- sampling and moments -----------------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: torch.Generator,
        dtype: torch.dtype = _F64,
        return_components: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` exact samples of shape ``(n, *shape)``: ``k ~ Cat(pi)``, ``x = mu_k + L_k eps``.

        All randomness comes from ``generator`` (drawn on the generator's device, then moved to the mixture's).
        With ``return_components`` also returns the ``(n,)`` component index of each sample.
        """
        if not isinstance(generator, torch.Generator):
            raise ValueError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        gdev = generator.device
        comp = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator).to(self.device)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_F64, device=gdev).to(self.device)
        x = self.means[comp] + (self.cholesky[comp] @ eps.unsqueeze(-1)).squeeze(-1)
        x = x.reshape(n, *self.shape).to(dtype)
        return (x, comp) if return_components else x

    def mean(self) -> torch.Tensor:
        """Mixture mean ``sum_k pi_k mu_k``, of the event shape, float64."""
        return (self.weights @ self.means).reshape(self.shape)

    def covariance(self) -> torch.Tensor:
        """``(d, d)`` mixture covariance ``sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T``, float64."""
        m = self.weights @ self.means
        second = torch.einsum("k,kij->ij", self.weights, self.covariances)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    # -- fitting ------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        data: Any,
        n_components: int,
        generator: torch.Generator,
        iters: int = 100,
        reg: float = 1e-4,
        tol: float = 1e-7,
    ) -> "GaussianMixture":
        """Maximum-likelihood mixture for ``data`` ``(N, *shape)`` by EM, in float64.

        Initialisation: k-means++ centres drawn with ``generator`` (first centre uniform, each next one with
        probability ∝ squared distance to the nearest centre), hard assignment to the nearest centre.
        Then EM: ``r_nk ∝ pi_k N(x_n; mu_k, Sigma_k)``; ``N_k = sum_n r_nk``, ``pi_k = N_k / N``,
        ``mu_k = sum_n r_nk x_n / N_k``, ``Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k + reg I``
        (the ridge keeps every component positive definite). Stops after ``iters`` iterations or when the mean
        log-likelihood improves by less than ``tol``.
        """
        if not isinstance(generator, torch.Generator):
            raise ValueError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))")
        x = _as_f64(data, "data")
        if x.ndim < 2:
            raise ValueError(f"data must have shape (N, ...) with a batch dimension, got {tuple(x.shape)}")
        shape = tuple(x.shape[1:])
        x = x.reshape(x.shape[0], -1)
        n, d = x.shape
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        if n < n_components:
            raise ValueError(f"need at least n_components = {n_components} data points, got {n}")
        if reg <= 0:
            raise ValueError(f"reg must be positive so that every covariance is positive definite, got {reg}")

        # k-means++ centres
        gdev = generator.device
        first = int(torch.randint(n, (1,), generator=generator, device=gdev))
        centres = [x[first]]
        d2 = (x - x[first]).square().sum(-1)
        for _ in range(1, n_components):
            total = d2.sum()
            if total <= 0:
                raise ValueError(f"data has fewer than n_components = {n_components} distinct points")
            idx = int(torch.multinomial((d2 / total).to(gdev), 1, generator=generator))
            centres.append(x[idx])
            d2 = torch.minimum(d2, (x - x[idx]).square().sum(-1))
        centres = torch.stack(centres)
        assign = torch.cdist(x, centres).argmin(-1)
        resp = torch.nn.functional.one_hot(assign, n_components).to(_F64)

        eye = torch.eye(d, dtype=_F64, device=x.device)
        tiny = torch.finfo(_F64).tiny
        prev = -math.inf
        mixture = None
        for _ in range(max(1, iters)):
            nk = resp.sum(0).clamp_min(tiny)
            weights = nk / nk.sum()
            means = (resp.T @ x) / nk[:, None]
            diff = x[None] - means[:, None]  # (K, N, d)
            covs = torch.einsum("nk,kni,knj->kij", resp, diff, diff) / nk[:, None, None] + reg * eye
            mixture = cls(weights, means, covs, shape=shape)
            log_comp = mixture.log_component(x)
            ll = float(torch.logsumexp(log_comp, -1).mean())
            resp = torch.softmax(log_comp, -1)
            if ll - prev < tol:
                break
            prev = ll
        return mixture


def _flow_stats(prior: GaussianMixture):
    """Eigendecomposition ``Sigma_k = U_k diag(lam_k) U_k^T`` used by the time-``s`` formulas."""
    lam, u = torch.linalg.eigh(prior.covariances)
    mu_rot = torch.einsum("kji,kj->ki", u, prior.means)  # U_k^T mu_k
    return lam, u, mu_rot


class AnalyticGMMFlow(FlowModel):
    """The exact rectified flow of a Gaussian-mixture prior on images of shape ``(C, H, W)`` (pixel space).

    Args:
        weights: ``(K,)`` mixture weights (non-negative, summing to 1).
        means: ``(K, d)`` (or ``(K, C, H, W)``) component means, ``d = C * H * W``.
        covariances: ``(K, d, d)`` positive-definite component covariances.
        shape: the image shape ``(C, H, W)``.
        device: where the float64 arithmetic runs (default CPU); inputs are moved there and results moved back.

    For ``x`` at time ``s`` (1 = noise, 0 = data), with ``m_k = (1 - s) mu_k`` and
    ``C_k = (1 - s)^2 Sigma_k + s^2 I``::

        r_k(x)         = softmax_k( log pi_k + log N(x; m_k, C_k) )
        E[x0 | x, k]   = mu_k + (1 - s) Sigma_k C_k^{-1} (x - m_k)
        x0_hat(x)      = sum_k r_k(x) E[x0 | x, k]
        v(x, s)        = (x - x0_hat(x)) / s
                       = sum_k r_k(x) [ (s I - (1 - s) Sigma_k) C_k^{-1} (x - m_k) - mu_k ]

    The last line is the same velocity with the division by ``s`` carried out symbolically (use
    ``C_k - (1 - s) Sigma_k = s (s I - (1 - s) Sigma_k)``). It is what :meth:`velocity` evaluates: it is exact
    for every ``s`` in ``[0, 1]``, needs no clamping, and at ``s = 0`` gives the limit ``v(x, 0) = -x``
    (``E[eps | x_0] = 0`` since ``eps`` is independent of the data; this needs positive-definite ``Sigma_k``).
    At ``s = 1`` it gives ``v = x - E[x0]``.

    Because ``C_k`` changes with ``s`` and may differ per sample, each ``Sigma_k`` is diagonalised once,
    ``Sigma_k = U_k diag(lam_k) U_k^T``; then ``C_k = U_k diag((1 - s)^2 lam_k + s^2) U_k^T`` and every solve
    with ``C_k`` is a division by a positive diagonal in that basis (no inverse is formed, no per-step
    factorisation). Densities of the prior and of posteriors use Cholesky solves (:class:`GaussianMixture`).

    Tensors in image space come back in the input's dtype; all arithmetic is float64.
    """

    spatial_factor = 1
    size_multiple = 1

    def __init__(
        self,
        weights: Any,
        means: Any,
        covariances: Any,
        shape: Sequence[int],
        device: torch.device | str | None = None,
    ) -> None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be an image shape (C, H, W) of positive sizes, got {shape}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        means = _as_f64(means, "means", device)
        if means.ndim == 4:
            if tuple(means.shape[1:]) != shape:
                raise ValueError(f"image-shaped means must have shape {_batched(shape, 'K')}, got {tuple(means.shape)}")
            means = means.reshape(means.shape[0], -1)
        if means.ndim == 2 and means.shape[1] != math.prod(shape):
            raise ValueError(
                f"means have dimension {means.shape[1]} but the image shape {shape} has "
                f"d = {math.prod(shape)} elements"
            )
        self.prior = GaussianMixture(weights, means, covariances, shape=shape)
        self._setup(device)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, shape: Sequence[int] | None = None) -> "AnalyticGMMFlow":
        """The flow whose data distribution is ``mixture`` (e.g. an exact posterior), on ``mixture.shape``."""
        shape = mixture.shape if shape is None else shape
        return cls(mixture.weights, mixture.means, mixture.covariances, shape, device=mixture.device)

    def _setup(self, device: torch.device) -> None:
        p = self.prior
        if p.device != device:
            p = GaussianMixture(p.weights.to(device), p.means.to(device), p.covariances.to(device), shape=p.shape)
            self.prior = p
        self.shape = p.shape
        self.device = device
        self.dtype = _F64
        self.image_channels = self.shape[0]
        self.default_size = (self.shape[1], self.shape[2])
        self._lam, self._u, self._mu_rot = _flow_stats(p)

    def to(self, *args, **kwargs) -> "AnalyticGMMFlow":
        """Move the float64 arithmetic to a device (in place), as ``to(device)``, ``to(device, torch.float64)`` or
        ``to(device=..., dtype=...)``; returns self. The arithmetic stays float64 (inputs come back in their own
        dtype), so any other dtype is refused."""
        device, dtype = to_arguments(*args, **kwargs)
        if dtype is not None and dtype != _F64:
            raise ValueError(f"AnalyticGMMFlow computes in float64 only, got dtype={dtype}; drop the dtype (its "
                             f"outputs already come back in the input's dtype)")
        if device is not None:
            self._setup(device)
        return self

    def __repr__(self) -> str:
        return f"AnalyticGMMFlow(n_components={self.n_components}, shape={self.shape}, device={self.device})"

    # -- parameters ---------------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return self.prior.weights

    @property
    def means(self) -> torch.Tensor:
        return self.prior.means

    @property
    def covariances(self) -> torch.Tensor:
        return self.prior.covariances

    @property
    def n_components(self) -> int:
        return self.prior.n_components

    @property
    def dim(self) -> int:
        return self.prior.dim

    # -- FlowModel interface ------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``linspace(1, 0, num_steps + 1)`` in float32 (no shift); height/width, if given, must match the model."""
        check_num_steps(num_steps)
        if height is not None or width is not None:
            self.latent_shape(self.shape[1] if height is None else height, self.shape[2] if width is None else width)
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H, W)``; the analytic prior exists only at its own size."""
        self.check_size(height, width)
        if (height, width) != self.shape[1:]:
            raise ValueError(
                f"AnalyticGMMFlow is defined on {self.shape[1]}x{self.shape[2]} images only, got "
                f"height={height}, width={width}; use height={self.shape[1]}, width={self.shape[2]}"
            )
        return self.shape

    def _prepare(self, x: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape {_batched(self.shape)}, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape {_batched(self.shape)}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        b = x.shape[0]
        s = expand_sigma(torch.as_tensor(sigma, dtype=_F64).cpu(), torch.empty(b, 1, dtype=_F64))
        s = s.reshape(-1).expand(b).to(self.device)
        if not torch.isfinite(s).all() or (s < 0).any() or (s > 1).any():
            raise ValueError(f"sigma must lie in [0, 1] (1 = noise, 0 = data), got {s.unique().tolist()[:8]}")
        return x.to(device=self.device, dtype=_F64).reshape(b, -1), s

    def _terms(self, x: torch.Tensor, s: torch.Tensor):
        """Responsibilities ``r (B, K)``, ``z = U_k^T C_k^{-1} (x - m_k)`` ``(B, K, d)`` and ``a = 1 - s``."""
        a = (1 - s)[:, None, None]
        c = a.square() * self._lam[None] + s.square()[:, None, None]  # eigenvalues of C_k, (B, K, d)
        u = torch.einsum("kji,bj->bki", self._u, x) - a * self._mu_rot[None]  # U_k^T (x - m_k)
        log_n = -0.5 * ((u.square() / c).sum(-1) + torch.log(c).sum(-1) + self.dim * _LOG_2PI)
        r = torch.softmax(self.prior._log_weights + log_n, dim=-1)
        return r, u / c, a

    def responsibilities(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``(B, K)`` float64 ``r_k(x) = p(k | x_s = x)``."""
        with torch.no_grad():
            xf, s = self._prepare(x, sigma)
            return self._terms(xf, s)[0].to(x.device)

    def velocity(
        self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Any = None, grad: bool = False
    ) -> torch.Tensor:
        """Exact ``v(x, s) = E[eps - x0 | x_s = x]`` for ``x (B, C, H, W)``, ``sigma`` scalar or ``(B,)``.

        ``cond`` is ignored (the model is unconditional). Differentiable in ``x`` when ``grad=True``
        (DPS-style methods); otherwise computed without autograd. Returns the input's dtype and device.
        """
        with torch.set_grad_enabled(grad):
            xf, s = self._prepare(x, sigma)
            r, z, a = self._terms(xf, s)
            v_rot = (s[:, None, None] - a * self._lam[None]) * z - self._mu_rot[None]
            v = torch.einsum("kij,bkj->bi", self._u, r[..., None] * v_rot)
            return v.reshape(x.shape).to(dtype=x.dtype, device=x.device)

    def x0_hat(self, x: torch.Tensor, sigma: float | torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Exact posterior mean ``E[x0 | x_s = x] = sum_k r_k (mu_k + (1 - s) Sigma_k C_k^{-1} (x - m_k))``.

        Differentiable in ``x`` when ``grad=True``. Returns the input's dtype and device.
        """
        with torch.set_grad_enabled(grad):
            xf, s = self._prepare(x, sigma)
            r, z, a = self._terms(xf, s)
            e_rot = self._mu_rot[None] + a * self._lam[None] * z
            x0 = torch.einsum("kij,bkj->bi", self._u, r[..., None] * e_rot)
            return x0.reshape(x.shape).to(dtype=x.dtype, device=x.device)

    def marginal(self, sigma: float) -> GaussianMixture:
        """The exact marginal ``p_s = sum_k pi_k N(m_k, C_k)`` of ``x_s`` at a scalar ``sigma`` in ``[0, 1]``."""
        s = float(sigma)
        if not 0 <= s <= 1:
            raise ValueError(f"sigma must lie in [0, 1], got {s}")
        eye = torch.eye(self.dim, dtype=_F64, device=self.device)
        covs = (1 - s) ** 2 * self.covariances + s**2 * eye
        return GaussianMixture(self.weights, (1 - s) * self.means, covs, shape=self.shape)

    # -- prior --------------------------------------------------------------------------------------
    def sample_prior(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` exact prior samples ``(n, C, H, W)`` drawn with ``generator`` (float32 unless ``dtype`` says)."""
        return self.prior.sample(n, generator, dtype=dtype)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float64 prior log-density ``log p(x0)`` of images ``(N, C, H, W)``."""
        return self.prior.log_prob(x0)

    # -- exact posteriors for linear measurements ---------------------------------------------------
    def measurement_matrix(self, operator: Any) -> torch.Tensor:
        """Dense ``A (m, d)`` float64 of a linear operator (see :meth:`_dense_operator`)."""
        return self._dense_operator(operator)[0]

    def _dense_operator(self, operator: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(A, out_shape)``: the dense ``A (m, d)`` float64 from the operator's response to the ``d`` basis images.

        ``operator(x)`` maps ``(B, C, H, W) -> (B, C', H', W')`` and must have ``is_linear == True``. An
        ``nn.Module`` is copied and cast to float64 first; the result is checked against ``op(0) = 0`` and
        against ``op(w) = A w`` for a fixed test image ``w``.
        """
        if getattr(operator, "is_linear", False) is not True:
            raise ValueError(
                f"the exact posterior needs a linear operator (is_linear == True); {type(operator).__name__} "
                f"has is_linear={getattr(operator, 'is_linear', None)!r}"
            )
        op = operator
        if isinstance(operator, nn.Module):
            op = copy.deepcopy(operator).to(device=self.device, dtype=_F64)
        d = self.dim
        basis = torch.eye(d, dtype=_F64, device=self.device).reshape(d, *self.shape)
        w = torch.cos(torch.arange(d, dtype=_F64, device=self.device) * 0.7 + 0.3)
        with torch.no_grad():
            cols = op(basis)
            zero = op(torch.zeros(1, *self.shape, dtype=_F64, device=self.device))
            at_w = op(w.reshape(1, *self.shape))
        if not isinstance(cols, torch.Tensor) or cols.shape[0] != d:
            raise ValueError(
                f"operator must map {_batched(self.shape)} to a tensor (B, ...); got {type(cols).__name__}"
            )
        a = cols.reshape(d, -1).T.to(_F64)
        scale = float(a.abs().max().clamp_min(1.0))
        tol = 1e-5 * scale * (1 + float(w.abs().sum()))
        if float(zero.to(_F64).abs().max()) > 1e-5 * scale:
            raise ValueError(
                f"{type(operator).__name__} reports is_linear=True but op(0) != 0 (it is affine, not linear); "
                "subtract op(0) from the measurement and use the linear part"
            )
        if float((at_w.reshape(-1).to(_F64) - a @ w).abs().max()) > tol:
            raise ValueError(
                f"{type(operator).__name__} reports is_linear=True but op(w) differs from A w for a test image w; "
                "the exact posterior needs a truly linear operator"
            )
        return a, tuple(cols.shape[1:])

    def posteriors(self, operator: Any, y: torch.Tensor, noise_std: float) -> list[GaussianMixture]:
        """Exact posteriors ``p(x0 | y_b)`` for a batch of measurements ``y (B, C', H', W')``, one per item.

        Measurement model ``y = A x0 + n``, ``n ~ N(0, noise_std^2 I)``, ``A`` from :meth:`measurement_matrix`.
        Per component (the covariance part is shared by all items and computed once)::

            S_k   = A Sigma_k A^T + sigma_n^2 I          (Cholesky-factored)
            pi'_k ∝ pi_k N(y; A mu_k, S_k)
            G_k   = Sigma_k A^T S_k^{-1}
            mu'_k = mu_k + G_k (y - A mu_k)
            Sigma'_k = Sigma_k - G_k A Sigma_k

        ``Sigma'_k`` is evaluated in the algebraically equal Joseph form
        ``(I - G_k A) Sigma_k (I - G_k A)^T + sigma_n^2 G_k G_k^T``, a sum of positive semi-definite terms,
        so that it stays positive definite in floating point for small noise. ``noise_std`` must be > 0
        (with no noise the posterior is degenerate on the set ``A x = y`` and has no density).
        """
        sn = float(noise_std)
        if not math.isfinite(sn) or sn <= 0:
            raise ValueError(
                f"noise_std must be a positive number (the posterior of noiseless measurements has no density), "
                f"got {noise_std!r}; use a small value such as 1e-3 for near-noiseless measurements"
            )
        a, out_shape = self._dense_operator(operator)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor of shape {_batched(out_shape)}, got {type(y).__name__}")
        if tuple(y.shape) == out_shape:
            raise ValueError(f"y has the measurement shape {out_shape} but no batch dimension; pass y[None]")
        if y.ndim != len(out_shape) + 1 or tuple(y.shape[1:]) != out_shape:
            raise ValueError(
                f"y must have shape {_batched(out_shape)} = the operator's output for a {_batched(self.shape)} image, "
                f"got {tuple(y.shape)}"
            )
        yf = _as_f64(y, "y", self.device).reshape(y.shape[0], -1)
        m = a.shape[0]
        p = self.prior
        eye_m = torch.eye(m, dtype=_F64, device=self.device)
        eye_d = torch.eye(self.dim, dtype=_F64, device=self.device)
        sig_at = p.covariances @ a.T  # (K, d, m)
        s_k = a @ sig_at + sn**2 * eye_m  # (K, m, m)
        evidence = GaussianMixture(p.weights, p.means @ a.T, 0.5 * (s_k + s_k.transpose(-1, -2)))
        # G_k = Sigma_k A^T S_k^{-1}  <=>  S_k G_k^T = A Sigma_k
        g = torch.cholesky_solve(sig_at.transpose(-1, -2), evidence.cholesky).transpose(-1, -2)  # (K, d, m)
        i_ga = eye_d - g @ a
        post_cov = i_ga @ p.covariances @ i_ga.transpose(-1, -2) + sn**2 * g @ g.transpose(-1, -2)
        post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
        log_w = evidence.log_component(yf)  # (B, K)
        weights = torch.softmax(log_w, dim=-1)
        resid = yf[:, None, :] - evidence.means[None]  # (B, K, m)
        post_means = p.means[None] + torch.einsum("kdm,bkm->bkd", g, resid)
        out = []
        for b in range(yf.shape[0]):
            try:
                out.append(GaussianMixture(weights[b], post_means[b], post_cov, shape=self.shape))
            except ValueError as exc:
                raise ValueError(
                    f"the posterior covariance is numerically singular for noise_std={sn:g}; "
                    f"use a larger noise_std ({exc})"
                ) from exc
        return out

    def posterior(self, operator: Any, y: torch.Tensor, noise_std: float) -> GaussianMixture:
        """Exact posterior ``p(x0 | y)`` for ONE measurement ``y`` of shape ``(1, C', H', W')``.

        See :meth:`posteriors` for the formulas and for batches of measurements.
        """
        result = self.posteriors(operator, y, noise_std)
        if len(result) != 1:
            raise ValueError(
                f"posterior takes one measurement with batch size 1, got batch {len(result)} (shape "
                f"{tuple(y.shape)}); use posteriors(...) for a list with one posterior per item"
            )
        return result[0]

    # -- fitting to images --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        patches: torch.Tensor,
        n_components: int,
        generator: torch.Generator,
        iters: int = 100,
        reg: float = 1e-4,
        tol: float = 1e-7,
    ) -> "AnalyticGMMFlow":
        """Fit the prior to image patches ``(N, C, H, W)`` (in ``[-1, 1]``) by EM; see :meth:`GaussianMixture.fit`."""
        if not isinstance(patches, torch.Tensor) or patches.ndim != 4:
            shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"patches must be a tensor (N, C, H, W), got {shape}")
        mixture = GaussianMixture.fit(patches, n_components, generator=generator, iters=iters, reg=reg, tol=tol)
        return cls.from_mixture(mixture, shape=tuple(patches.shape[1:]))


def image_patches(
    images: Sequence[torch.Tensor], size: int, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` random ``size x size`` crops ``(n, C, size, size)`` from a list of float images.

    Each image is ``(C, H, W)`` or ``(H, W)`` (one channel); all must have the same channel count. For every
    crop an image is chosen uniformly, then a uniform top-left corner; all draws use ``generator``.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0))")
    if not isinstance(size, int) or size < 1 or not isinstance(n, int) or n < 1:
        raise ValueError(f"size and n must be positive integers, got size={size!r}, n={n!r}")
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one (C, H, W) tensor")
    imgs = []
    for i, img in enumerate(images):
        img = torch.as_tensor(img)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3:
            raise ValueError(f"image {i} must have shape (C, H, W) or (H, W), got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise ValueError(
                f"image {i} has dtype {img.dtype}; convert it to float in [-1, 1] first, e.g. img.float() / 127.5 - 1"
            )
        if img.shape[1] < size or img.shape[2] < size:
            raise ValueError(f"image {i} of size {tuple(img.shape[1:])} is smaller than the crop size {size}")
        imgs.append(img)
    channels = {img.shape[0] for img in imgs}
    if len(channels) != 1:
        raise ValueError(f"all images must have the same number of channels, got {sorted(channels)}")
    gdev = generator.device
    which = torch.randint(len(imgs), (n,), generator=generator, device=gdev).tolist()
    u = torch.rand(n, 2, generator=generator, dtype=_F64, device=gdev).tolist()
    crops = []
    for j, (ui, uj) in zip(which, u):
        img = imgs[j]
        top = min(int(ui * (img.shape[1] - size + 1)), img.shape[1] - size)
        left = min(int(uj * (img.shape[2] - size + 1)), img.shape[2] - size)
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)
