"""Priors with exact velocities and posteriors, used to score guidance methods against the truth:
a Gaussian mixture over images or image patches (``gaussian_mixture``) and a categorical mixture over token
sequences on the simplex (``categorical``)."""

from .categorical import AnalyticSimplexFlow, CategoricalMixture
from .gaussian_mixture import AnalyticGMMFlow, GaussianMixture, image_patches

__all__ = ["AnalyticGMMFlow", "AnalyticSimplexFlow", "CategoricalMixture", "GaussianMixture", "image_patches"]
