"""The posterior scores on cases with known answers."""

import torch

from guidance import GaussianMixture
from tasks.studies import posterior_scores as scores


def test_posterior_mean_scores_one_and_posterior_samples_score_about_two():
    generator = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                              torch.eye(4, dtype=torch.float64)[None], shape=(1, 2, 2))
    x_true = mixture.sample(4000, generator)
    means = torch.zeros_like(x_true)
    assert scores.mse_over_mmse(means, x_true, means) == 1.0
    independent = mixture.sample(4000, generator)
    assert abs(scores.mse_over_mmse(independent, x_true, means) - 2.0) < 0.1


def test_sliced_w2_is_small_for_one_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 1, 2, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(2000, 1, 2, 2, generator=generator, dtype=torch.float64)
    same = scores.sliced_w2(a, b, torch.Generator().manual_seed(2))
    shifted = scores.sliced_w2(a, b + 1.0, torch.Generator().manual_seed(2))
    assert same < 0.1 and shifted > 0.8


def test_mode_weight_error_of_one_mode_against_two_equal_modes_is_one_half():
    means = torch.tensor([[-5.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    mixture = GaussianMixture(torch.tensor([0.5, 0.5], dtype=torch.float64), means,
                              torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone(), shape=(2, 1, 1))
    one_mode = torch.tensor([-5.0, 0.0], dtype=torch.float64).expand(100, 2).reshape(100, 2, 1, 1)
    assert abs(scores.mode_weight_error(mixture, one_mode) - 0.5) < 1e-12
    both = mixture.sample(4000, torch.Generator().manual_seed(3))
    assert scores.mode_weight_error(mixture, both) < 0.03
