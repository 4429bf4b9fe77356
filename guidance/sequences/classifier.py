"""A small classifier or regressor over one-hot sequences, the objective of straight-through guidance.

Straight-through guidance (:mod:`guidance.methods.straight_through`, Tang et al. 2025) evaluates the objective on
hard one-hot sequences and passes the gradient to the soft simplex state, so the model only ever needs to be
good on clean sequences: it is trained here on ``F.one_hot(tokens)`` alone. It is still an ordinary
differentiable function of (B, L, K) float rows, so gradients flow into soft inputs too::

    h = ReLU(Conv1d_k(ReLU(Conv1d_k(x))))           (B, d, L), kernel k over positions
    y = W [mean_l h, max_l h] + b                   (B, num_outputs): class logits, or regression values

Classification minimises cross-entropy; regression minimises the mean squared error of standardised targets
and the model returns values in the targets' units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .simplex import check_length_and_vocabulary
from .network import check_positive_int, check_tokens, seed_from

__all__ = ["SequenceClassifier", "train_sequence_classifier"]

TASKS = ("classification", "regression")


class SequenceClassifier(nn.Module):
    """Convolutional classifier / regressor over (B, L, K) one-hot (or soft) sequences.

    ``forward`` returns class logits (B, num_outputs) for ``task="classification"`` (ready for
    :class:`~guidance.objectives.ClassifierObjective`), and for ``task="regression"`` values (B,) when
    ``num_outputs`` is 1 (ready for :class:`~guidance.objectives.RewardObjective`), else (B, num_outputs).
    """

    def __init__(self, length: int, vocab_size: int, num_outputs: int, task: str = "classification",
                 width: int = 64, kernel: int = 5):
        super().__init__()
        self.length, self.vocab_size = check_length_and_vocabulary(length, vocab_size)
        self.num_outputs, self.width, self.kernel = (check_positive_int(name, value) for name, value in
                                                     (("num_outputs", num_outputs), ("width", width),
                                                      ("kernel", kernel)))
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self.config = {"length": length, "vocab_size": vocab_size, "num_outputs": num_outputs, "task": task,
                       "width": width, "kernel": kernel}
        self.features = nn.Sequential(nn.Conv1d(vocab_size, width, kernel, padding=kernel // 2), nn.ReLU(),
                                      nn.Conv1d(width, width, kernel, padding=kernel // 2), nn.ReLU())
        self.head = nn.Linear(2 * width, num_outputs)
        # regression outputs are predicted standardised, then mapped back: y = mean + std · head(...)
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_std", torch.ones(num_outputs))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output (B, num_outputs): logits, or standardised regression values. No input checks."""
        h = self.features(x.to(self.head.weight.dtype).transpose(1, 2))  # (B, d, L)
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"sequences must be a (B, L, K) tensor of one-hot or soft rows, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.vocab_size:
            raise ValueError(f"the classifier was trained on a vocabulary of {self.vocab_size} tokens but got "
                             f"sequences with {x.shape[-1]} tokens per position")
        y = self.raw(x)
        if self.task == "classification":
            return y
        y = self.target_mean + self.target_std * y
        return y[:, 0] if self.num_outputs == 1 else y


def _check_targets(targets: Any, n: int, task: str) -> torch.Tensor:
    targets = torch.as_tensor(targets)
    if targets.shape[:1] != (n,) or targets.ndim not in ((1,) if task == "classification" else (1, 2)):
        shape = "(N,)" if task == "classification" else "(N,) or (N, D)"
        raise ValueError(f"targets must have shape {shape} with N = {n} (one per sequence), "
                         f"got {tuple(targets.shape)}")
    if task == "classification":
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or bool((targets < 0).any()):
            raise ValueError("classification targets must be integer class labels >= 0 (for real-valued "
                             "targets use task='regression')")
        return targets.long()
    targets = targets.double()
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("regression targets contain NaN or infinite values")
    return targets.reshape(n, -1)


def train_sequence_classifier(
    tokens: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    *,
    task: str = "classification",
    num_outputs: int | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> tuple[SequenceClassifier, list[float]]:
    """Fit a :class:`SequenceClassifier` to clean sequences ``tokens`` (N, L) and ``targets`` with Adam; returns
    the model (eval mode) and the per-step losses.

    Classification: integer labels (N,), cross-entropy; ``num_outputs`` defaults to max label + 1 (at least 2).
    Regression: real targets (N,) or (N, D), squared error on targets standardised to mean 0 and std 1. All
    randomness (init and batches) comes from ``generator``: the same seed gives the same weights.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_length_and_vocabulary(1, vocab_size)
    tokens = check_tokens(tokens, vocab_size, "tokens")
    targets = _check_targets(targets, tokens.shape[0], task).to(tokens.device)
    steps, batch_size = check_positive_int("steps", steps), check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if task == "classification":
        needed = int(targets.max()) + 1
        num_outputs = max(needed, 2) if num_outputs is None else num_outputs
        if check_positive_int("num_outputs", num_outputs) < needed:
            raise ValueError(f"num_outputs={num_outputs} but the targets hold labels up to {needed - 1}")
    else:
        num_outputs = targets.shape[1] if num_outputs is None else num_outputs
        if num_outputs != targets.shape[1]:
            raise ValueError(f"num_outputs={num_outputs} but the regression targets have {targets.shape[1]} columns")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(generator))
        model = SequenceClassifier(tokens.shape[1], vocab_size, num_outputs, task, width=width).to(tokens.device)
    if task == "regression":
        mean, std = targets.mean(0), targets.std(0, unbiased=False).clamp_min(1e-12)
        model.target_mean.copy_(mean.float())
        model.target_std.copy_(std.float())
        targets = ((targets - mean) / std).float()
    draw_device = generator.device if generator is not None else tokens.device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="training sequence classifier"):
        index = torch.randint(tokens.shape[0], (batch_size,), generator=generator, device=draw_device)
        index = index.to(tokens.device)
        onehot = F.one_hot(tokens[index], vocab_size).float()
        output = model.raw(onehot)
        if task == "classification":
            loss = F.cross_entropy(output, targets[index])
        else:
            loss = F.mse_loss(output, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses
