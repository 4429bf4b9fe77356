"""Scores of restorations against an exact posterior (analytic Gaussian-mixture priors).

For pairs (x_true, y) and one output per pair:

* ``mse_over_mmse`` = mean ‖x_out − x_true‖² / mean ‖x_true − E[x0 | y]‖²: the posterior mean scores 1, an
  exact posterior sampler 2 (in expectation), prior samples far more;
* ``residual_over_noise`` = RMS of A(x_out) − y divided by the noise std (about 1 for a sampler that fits
  the data to the noise level, 0 for over-fitting, large for ignoring the data);
* ``log_density_gap`` = mean log p(x_out | y) − mean log p(x_post | y) with x_post exact posterior samples
  (0 for a sampler; strongly negative for blends between modes).

For many outputs for one y:

* ``sliced_w2`` = sliced 2-Wasserstein distance to as many exact posterior samples;
* ``mode_weight_error`` = total-variation distance between the posterior component weights and the
  proportions of outputs assigned to each component (largest posterior responsibility).
"""

from __future__ import annotations

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def mse_over_mmse(outputs: torch.Tensor, x_true: torch.Tensor, posterior_means: torch.Tensor) -> float:
    error = (_flat(outputs) - _flat(x_true)).pow(2).sum(1).mean()
    mmse = (_flat(posterior_means) - _flat(x_true)).pow(2).sum(1).mean()
    return float(error / mmse)


def residual_over_noise(operator, outputs: torch.Tensor, y: torch.Tensor, noise_std: float) -> float:
    residual = _flat(operator(outputs.to(torch.float64)) - y.to(torch.float64))
    return float(residual.pow(2).mean().sqrt() / noise_std)


def log_density_gap(posteriors, outputs: torch.Tensor, generator: torch.Generator) -> float:
    ours, reference = [], []
    for posterior, x in zip(posteriors, outputs):
        ours.append(posterior.log_prob(x[None].to(torch.float64))[0])
        reference.append(posterior.log_prob(posterior.sample(1, generator))[0])
    return float(torch.stack(ours).mean() - torch.stack(reference).mean())


def sliced_w2(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, projections: int = 128) -> float:
    """Sliced 2-Wasserstein distance between two equal-size samples (random unit directions)."""
    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs samples of the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = (a @ directions).sort(dim=0)
    pb, _ = (b @ directions).sort(dim=0)
    return float((pa - pb).pow(2).mean().sqrt())


def mode_weight_error(posterior, outputs: torch.Tensor) -> float:
    assigned = posterior.responsibilities(_flat(outputs)).argmax(1)
    proportions = torch.bincount(assigned, minlength=posterior.n_components).to(torch.float64) / outputs.shape[0]
    return float(0.5 * (proportions - posterior.weights).abs().sum())
