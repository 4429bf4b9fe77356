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

    python -m tasks.studies.sequence_benchmark --exact [--samples 4000] [--steps 40]

runs instead the exact comparison of what the methods sample: a prior over 3⁴ = 81 sequences (two components,
seed 3), a linear classifier p(y | h) = sigmoid(<w, h> - 2) (w ~ 1.5 N(0, 1), seed 8; 16 % of the prior is
class 1), and the classifier-tilted posterior p(x) p(y | x), all enumerated. Per method: the mean p(y | x), the
total variation of the samples' distribution from the prior and from the tilted posterior, the distinct
sequences and the entropy of the samples' distribution; straight-through guidance over gamma and ``diversity``,
particle search (reward log p(y | x), temperature 1, ``select="sample"``: the tilted posterior is its target)
at the same NFE, and the deterministic sampler of the exact tilted prior (the path's own error).
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


EXACT_LENGTH, EXACT_VOCAB = 4, 3


@dataclass
class ExactRow:
    method: str
    score: float
    tv_prior: float
    tv_tilted: float
    distinct: int
    entropy: float
    nfe: int


def exact_problem() -> tuple[AnalyticSimplexFlow, LinearSequenceClassifier]:
    """The 81-sequence prior and its linear classifier (class 1: 16 % of the prior)."""
    prior = CategoricalMixture.random(2, EXACT_LENGTH, EXACT_VOCAB, generator=torch.Generator().manual_seed(3))
    weights = 1.5 * torch.randn(EXACT_LENGTH, EXACT_VOCAB, generator=torch.Generator().manual_seed(8))
    return AnalyticSimplexFlow(prior), LinearSequenceClassifier(weights, bias=2.0)


def exact_benchmark(samples: int = 4000, steps: int = 40, seed: int = 0) -> tuple[list[ExactRow], dict]:
    """The rows of ``--exact`` and the target's own figures (module docstring)."""
    from guidance.sequences.simplex import sample_sequences

    flow, classifier = exact_problem()
    objective = ClassifierObjective(classifier, 1, space="latent", num_classes=2)
    everything = torch.cartesian_prod(*[torch.arange(EXACT_VOCAB)] * EXACT_LENGTH)
    place = EXACT_VOCAB ** torch.arange(EXACT_LENGTH - 1, -1, -1)
    prior = flow.prior.log_prob(everything).exp()
    with torch.no_grad():
        score = classifier(F.one_hot(everything, EXACT_VOCAB).float()).softmax(1)[:, 1].double()
    tilted = prior * score / (prior * score).sum()

    def row(name: str, tokens: torch.Tensor, nfe: int) -> ExactRow:
        found = torch.bincount((tokens * place).sum(1), minlength=len(everything)).double() / len(tokens)
        kept = found[found > 0]
        return ExactRow(name, float((found * score).sum()), float(0.5 * (found - prior).abs().sum()),
                        float(0.5 * (found - tilted).abs().sum()), int((found > 0).sum()),
                        float(-(kept * kept.log()).sum()), nfe)

    settings = [("unguided", {"gamma": 0.0})]
    settings += [(f"straight_through gamma {g:g}", {"gamma": g}) for g in (0.25, 0.5, 1.0, 2.0)]
    settings += [(f"straight_through gamma 2, diversity {b:g}", {"gamma": 2.0, "diversity": b}) for b in (1, 2, 4, 8)]
    rows = []
    for name, options in settings:
        out = get_method("straight_through", **options)(flow, objective, num_steps=steps, batch_size=samples,
                                                        progress=False, generator=torch.Generator().manual_seed(seed))
        rows.append(row(name, out.info["tokens"], out.nfe))
    k = 4
    run = get_method("particles", particles=k, temperature=1.0, select="sample")
    out = run(flow, objective, num_steps=steps // k, batch_size=samples, progress=False,
              generator=torch.Generator().manual_seed(seed))
    rows.append(row(f"particles K={k}, {steps // k} steps, sample", out.info["tokens"], out.nfe))
    # the deterministic sampler of the exact tilted prior: 81 one-sequence components weighted by p(x) p(y | x)
    onehot = F.one_hot(everything, EXACT_VOCAB).double().clamp_min(1e-12)
    exact_flow = AnalyticSimplexFlow(CategoricalMixture(tilted, onehot / onehot.sum(-1, keepdim=True)))
    out = sample_sequences(exact_flow, steps, batch_size=samples, generator=torch.Generator().manual_seed(seed),
                           progress=False)
    rows.append(row("unguided flow of the exact tilted prior", out.tokens, steps))
    target = {"score": float((tilted * score).sum()), "distinct": int((tilted > 1e-4).sum()),
              "entropy": float(-(tilted * tilted.log()).sum()), "prior_score": float((prior * score).sum())}
    return rows, target


def exact_markdown(rows: list[ExactRow], target: dict) -> str:
    lines = ["| method | p(y \\| x) | TV to prior | TV to p(x) p(y \\| x) | distinct | entropy | NFE |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.score:.3f} | {r.tv_prior:.3f} | {r.tv_tilted:.3f} | {r.distinct} | "
                     f"{r.entropy:.2f} | {r.nfe} |")
    lines.append(f"| exact p(x) p(y \\| x) | {target['score']:.3f} | | 0 | {target['distinct']} | "
                 f"{target['entropy']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.studies.sequence_benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, help="sequences per method (default 512)")
    parser.add_argument("--steps", type=int, help="Euler steps (default 50)")
    parser.add_argument("--m", type=int, default=8, help="hard samples per guided step (default 8)")
    parser.add_argument("--gamma", type=float, default=2.0, help="guidance scale (default 2.0)")
    parser.add_argument("--exact", action="store_true",
                        help="instead: the exact 81-sequence comparison of what the methods sample (module docstring; "
                             "--samples default 4000, --steps default 40)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.exact:
        if args.m != 8 or args.gamma != 2.0:
            parser.error("--m and --gamma do nothing with --exact (it sweeps gamma and diversity itself)")
        samples = 4000 if args.samples is None else args.samples
        found, target = exact_benchmark(samples, 40 if args.steps is None else args.steps)
        print(exact_markdown(found, target))
        if args.json:
            write_text_atomic(args.json, json.dumps({"rows": [asdict(r) for r in found], "target": target}, indent=2))
        return 0
    rows = benchmark(512 if args.samples is None else args.samples, 50 if args.steps is None else args.steps,
                     args.m, args.gamma)
    print(markdown(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
