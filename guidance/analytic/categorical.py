"""An analytic simplex flow: a known prior over sequences and its exact clean-token posterior.

Prior: a mixture of per-position categorical distributions,
``p(x_1) = sum_c pi_c prod_l Cat(x_1,l; theta_{c,l})``. With the Concrete likelihood of the Gumbel-softmax path,
``ell_l(k) = log q_s(x_l | k)`` (:meth:`GumbelSoftmaxPath.log_likelihood`), the posterior given the noisy state is::

    log w_c(x)          = log pi_c + sum_l logsumexp_k (log theta_{c,l,k} + ell_l(k))      (component weights)
    p(x_1,l = k | x, c) = softmax_k (log theta_{c,l,k} + ell_l(k))
    p(x_1,l = k | x)    = sum_c softmax_c(log w)_c · p(x_1,l = k | x, c)

It plays for sequences the role :class:`~guidance.analytic.gaussian_mixture.AnalyticGMMFlow` plays for images: exact, no
training. Arithmetic is float64.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones.base import to_arguments
from ..sequences.simplex import GumbelSoftmaxPath, SimplexFlow, check_length_and_vocabulary

__all__ = ["AnalyticSimplexFlow", "CategoricalMixture"]


class CategoricalMixture:
    """``sum_c pi_c prod_l Cat(theta_{c,l})`` over sequences of length L with K tokens.

    Args:
        weights: (C,) non-negative, summing to 1.
        probs: (C, L, K) per-component, per-position token probabilities (rows summing to 1).
    """

    def __init__(self, weights: Any, probs: Any):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.ndim != 3:
            raise ValueError(f"probs must have shape (C, L, K), got {tuple(probs.shape)}")
        if weights.shape != (probs.shape[0],):
            raise ValueError(f"weights must have shape ({probs.shape[0]},) to match probs, got {tuple(weights.shape)}")
        check_length_and_vocabulary(probs.shape[1], probs.shape[2])
        for name, t in (("weights", weights), ("probs", probs)):
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"{name} must be finite and non-negative")
            if (t.sum(-1) - 1).abs().max() > 1e-6:
                raise ValueError(f"{name} must sum to 1 along the last axis")
        self.weights, self.probs = weights, probs

    @property
    def device(self) -> torch.device:
        return self.probs.device

    def to(self, device: torch.device | str) -> "CategoricalMixture":
        """Move the float64 weights and probabilities to ``device`` in place; returns self."""
        self.weights, self.probs = self.weights.to(device), self.probs.to(device)
        return self

    @property
    def length(self) -> int:
        return self.probs.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.probs.shape[2]

    @classmethod
    def random(cls, components: int, length: int, vocab_size: int, concentration: float = 0.3,
               generator: torch.Generator | None = None) -> "CategoricalMixture":
        """Random mixture: equal-ish weights and Dirichlet(``concentration``) rows (small = peaked, motif-like)."""
        check_length_and_vocabulary(length, vocab_size)
        gamma = torch._standard_gamma(torch.full((components, length, vocab_size), float(concentration),
                                                 dtype=torch.float64), generator=generator)
        probs = gamma / gamma.sum(-1, keepdim=True)
        weights = torch.rand(components, generator=generator, dtype=torch.float64) + 0.5
        return cls(weights / weights.sum(), probs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, L) long token sequences, drawn on the generator's device and returned on the mixture's."""
        draw = generator.device if generator is not None else self.device
        weights, probs = self.weights.to(draw), self.probs.to(draw)
        c = torch.multinomial(weights, n, replacement=True, generator=generator)
        rows = probs[c].reshape(-1, self.vocab_size)
        return torch.multinomial(rows, 1, generator=generator).reshape(n, self.length).to(self.device)

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) log p(tokens) for (n, L) token sequences (float64)."""
        tokens = tokens.long().to(self.device)
        if tokens.ndim != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"tokens must have shape (n, {self.length}), got {tuple(tokens.shape)}")
        if bool((tokens < 0).any()) or bool((tokens >= self.vocab_size).any()):
            raise ValueError(f"tokens must lie in 0..{self.vocab_size - 1}")
        log_probs = self.probs.clamp_min(1e-300).log()  # (C, L, K)
        index = tokens[None, :, :, None].expand(self.probs.shape[0], -1, -1, 1)  # (C, n, L, 1)
        per_component = log_probs[:, None].expand(-1, tokens.shape[0], -1, -1).gather(-1, index)[..., 0].sum(-1)
        return torch.logsumexp(self.weights.log()[:, None] + per_component, dim=0)

    def marginals(self) -> torch.Tensor:
        """(L, K) per-position token probabilities of the mixture."""
        return (self.weights[:, None, None] * self.probs).sum(0)


class AnalyticSimplexFlow(SimplexFlow):
    """A simplex flow whose endpoint p(x_1 | x_s) is the exact posterior of a :class:`CategoricalMixture` prior
    under the Gumbel-softmax path (formulas in the module docstring). Arithmetic is float64 wherever the prior
    lives (:meth:`to` moves it)."""

    dtype = torch.float64

    def __init__(self, prior: CategoricalMixture, path: GumbelSoftmaxPath | None = None):
        super().__init__(prior.length, prior.vocab_size, path)
        self.prior = prior
        self.device = prior.device

    def to(self, *args, **kwargs) -> "AnalyticSimplexFlow":
        """Move the prior to a device (in place), as ``to(device)`` or ``to(device=..., dtype=torch.float64)``;
        returns self. The arithmetic stays float64, so any other dtype is refused."""
        device, dtype = to_arguments(*args, **kwargs)
        if dtype is not None and dtype != torch.float64:
            raise ValueError(f"AnalyticSimplexFlow computes in float64 only, got dtype={dtype}; drop the dtype")
        if device is not None:
            self.prior.to(device)
            self.device = device
        return self

    def posterior(self, x: torch.Tensor, sigma: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(component weights (B, C), p(x_1 | x_s) (B, L, K)), float64."""
        ell = self.path.log_likelihood(x, sigma)  # (B, L, K)
        joint = self.prior.probs.clamp_min(1e-300).log().to(ell.device)[None] + ell[:, None]  # (B, C, L, K)
        log_w = self.prior.weights.log().to(ell.device)[None] + torch.logsumexp(joint, -1).sum(-1)
        w = torch.softmax(log_w, dim=-1)
        return w, (w[..., None, None] * torch.softmax(joint, dim=-1)).sum(1)

    def endpoint(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.condition(cond)
        return self.posterior(x, sigma)[1].to(x.dtype)
