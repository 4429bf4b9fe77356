"""Straight-through guidance against unguided sampling and best-of-N on an exact simplex prior.

The README's table in "Straight-through guidance: sequences and hard inputs" comes from this study.

    python -m tasks.studies.sequence_benchmark [--samples 512] [--steps 50] [--m 8] [--gamma 2.0] [--json out.json]

The prior is a random mixture of three per-position categorical distributions over sequences of length 12 with
4 tokens (:class:`~guidance.analytic.categorical.CategoricalMixture`, seed 0), sampled through its exact
clean-token posterior. The classifier is known and differentiable on one-hot rows: p(class 1) = sigmoid(<w, h> - 5)
with w ~ N(0, 1) per position and token (seed 5), so that class 1 is rare under the prior (5 % of its samples). Every method generates the same number of sequences; best-of-N gets
N = M x steps candidates per sequence, the number of classifier calls straight-through guidance makes (and, for
reference, N = M). The table
gives the mean classifier probability of class 1, the share of sequences it assigns to class 1, the mean prior
log-probability (and its change against unguided samples: guidance must stay on the prior's support), classifier
calls and flow evaluations per sequence, and wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from guidance import AnalyticSimplexFlow, CategoricalMixture, ClassifierObjective, get_method

from guidance.loading.files import write_text_atomic

LENGTH, VOCAB, COMPONENTS = 12, 4, 3
BIAS = 5.0  # makes class 1 rare: 5 % of prior samples


class LinearSequenceClassifier(torch.nn.Module):
    """Two classes over one-hot rows h (B, L, K): logits (-z/2, z/2) with z = <w, h> - bias, so
    p(class 1) = sigmoid(<w, h> - bias)."""

    def __init__(self, weights: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.register_buffer("weights", weights)
        self.bias = float(bias)
        self.vocab_size = weights.shape[-1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = (h * self.weights).sum((-1, -2)) - self.bias
        return torch.stack([-z / 2, z / 2], dim=1)


def problem(seed: int = 0, bias: float = BIAS) -> tuple[AnalyticSimplexFlow, LinearSequenceClassifier]:
    prior = CategoricalMixture.random(COMPONENTS, LENGTH, VOCAB, generator=torch.Generator().manual_seed(seed))
    weights = torch.randn(LENGTH, VOCAB, generator=torch.Generator().manual_seed(seed + 5))
    return AnalyticSimplexFlow(prior), LinearSequenceClassifier(weights, bias)


@dataclass
class Row:
    method: str
    score: float
    class_1: float
    log_prob: float
    delta_log_prob: float
    classifier_calls: int
    nfe: int
    seconds: float


def _generate(method: str, options: dict, flow, objective, samples: int, steps: int, seed: int, chunk: int):
    """Tokens, classifier calls and NFE per sequence; best-of-N runs in chunks to bound memory."""
    run = get_method(method, **options)
    tokens, calls, nfe = [], 0, 0
    for start in range(0, samples, chunk):
        batch = min(chunk, samples - start)
        out = run(flow, objective, num_steps=steps, batch_size=batch, progress=False,
                  generator=torch.Generator().manual_seed(seed + start))
        tokens.append(out.info["tokens"])
        calls, nfe = out.info.get("objective_calls", 0), out.nfe
    return torch.cat(tokens), calls, nfe


def benchmark(samples: int = 512, steps: int = 50, m: int = 8, gamma: float = 2.0, seed: int = 1) -> list[Row]:
    flow, classifier = problem()
    objective = ClassifierObjective(classifier, 1, space="latent", num_classes=2)
    settings = [("unguided", "straight_through", {"gamma": 0.0}, samples)]
    for source in ("state", "endpoint"):
        for draw in ("sample", "argmax"):
            options = {"gamma": gamma, "samples": m, "source": source, "draw": draw}
            settings.append((f"straight_through {source}/{draw}", "straight_through", options, samples))
    settings.append((f"best_of_n N={m}", "best_of_n", {"candidates": m}, samples))
    settings.append((f"best_of_n N={m * steps}", "best_of_n", {"candidates": m * steps}, max(1, 16384 // (m * steps))))
    rows, reference = [], None
    for name, method, options, chunk in settings:
        begin = time.perf_counter()
        tokens, calls, nfe = _generate(method, options, flow, objective, samples, steps, seed, chunk)
        seconds = time.perf_counter() - begin
        with torch.no_grad():
            p1 = classifier(F.one_hot(tokens, VOCAB).float()).softmax(1)[:, 1]
        log_prob = flow.prior.log_prob(tokens).mean().item()
        reference = log_prob if reference is None else reference
        rows.append(Row(name, p1.mean().item(), (p1 > 0.5).float().mean().item(), log_prob, log_prob - reference,
                        calls, nfe, seconds))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| method | p(class 1) | classified 1 | prior log-prob | Δ vs unguided | classifier calls | NFE | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.score:.3f} | {r.class_1:.3f} | {r.log_prob:.2f} | {r.delta_log_prob:+.2f} | "
                     f"{r.classifier_calls} | {r.nfe} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.studies.sequence_benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="sequences per method (default 512)")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    parser.add_argument("--m", type=int, default=8, help="hard samples per guided step (default 8)")
    parser.add_argument("--gamma", type=float, default=2.0, help="guidance scale (default 2.0)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = benchmark(args.samples, args.steps, args.m, args.gamma)
    print(markdown(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
