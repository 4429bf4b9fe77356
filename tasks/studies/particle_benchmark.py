"""Particle search against best-of-N (and gradient guidance) at equal NFE, on priors whose tilted target is exact.

The README's table "Benchmark at equal NFE" (in "Particle search: rewards without a useful gradient") comes from
this study.

    python -m tasks.studies.particle_benchmark [--outputs 512] [--particles 8] [--steps 20] [--default-model] [--json out.json]

The reward is an indicator, r(x) = 1[x ∈ R]: no useful gradient, the case particle search is for. For a prior p
and λ = ``--temperature`` the target is the tilted distribution p̃(x) ∝ p(x) exp(λ r(x)), known exactly:

* **Gaussian mixture** (2-D, four components, :class:`~guidance.analytic.gaussian_mixture.AnalyticGMMFlow`), R a
  half-plane {a·x > c}. Component k's mass in R is Φ((a·μ_k - c) / sqrt(aᵀ Σ_k a)), so p̃ is a mixture of
  truncated Gaussians with mode weights π̃_k ∝ π_k (e^λ Φ_k + 1 - Φ_k); exact samples of p̃ come from prior
  samples accepted with probability exp(λ (r - 1)).
* **Categorical mixture** over sequences (``flowsteer design``'s analytic prior, length 8, ACGT, seed 0), R the
  sequences that contain the motif ``--motif``: all 4^8 sequences are enumerated, so p̃ is exact.

Every method makes K × N network evaluations per output (unguided: N): best-of-N with N = K candidates,
particles with K particles, and gradient guidance (FlowChef on the mixture, straight-through guidance on
sequences, both through a straight-through surrogate of the indicator) with K × N steps. Per method: the mean
reward (share of outputs in R), the distance to p̃ — total variation over the cells (most likely prior
component, r) against p̃'s, sliced Wasserstein-2 to exact p̃ samples (mixture), per-position token marginals
(sequences) — and the diversity (mean pairwise distance; Hamming for sequences) beside p̃'s.
``--default-model`` adds a small run on the embedded default model, the reward being the bundled classifier's
hard decision for a class.

    python -m tasks.studies.particle_benchmark --sweep 4,8,16,32,64 [--temperature 2] [--potential add] [--every 5]

runs instead particles alone on the mixture for each K, with ``select="best"`` and ``"sample"``: how close each
comes to p̃ as K grows (the README's table "best against sample as K grows").
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from guidance import AnalyticGMMFlow, CallableObjective, get_method
from guidance.loading.files import write_text_atomic
from guidance.features.hard_inputs import threshold

from ..commands.design import load_sequence_flow, motif_score

ALPHABET = "ACGT"


@dataclass
class Row:
    prior: str
    method: str
    reward: float
    cell_tv: float
    distance: float
    diversity: float
    nfe: int
    seconds: float


# -- the Gaussian mixture ------------------------------------------------------------------------------------
def mixture_problem():
    """(flow, a, c): four 2-D components; the half-plane a·x > c holds about 4 % of the prior's mass."""
    weights = torch.tensor([0.35, 0.3, 0.2, 0.15], dtype=torch.float64)
    means = torch.tensor([[-1.5, -1.0], [1.0, -1.5], [0.0, 1.5], [2.0, 1.0]], dtype=torch.float64)
    covariances = torch.stack([torch.tensor([[0.30, 0.10], [0.10, 0.25]]), torch.tensor([[0.25, -0.08], [-0.08, 0.30]]),
                               torch.tensor([[0.40, 0.0], [0.0, 0.15]]), torch.tensor([[0.20, 0.05], [0.05, 0.20]])])
    flow = AnalyticGMMFlow(weights, means.reshape(4, 2, 1, 1), covariances.double(), (2, 1, 1))
    a = torch.tensor([0.6, 0.8], dtype=torch.float64)
    return flow, a, 1.9


def region_mass(flow: AnalyticGMMFlow, a: torch.Tensor, c: float) -> torch.Tensor:
    """(K,) Φ_k = P(a·x > c | component k)."""
    mean = flow.means @ a
    std = torch.einsum("i,kij,j->k", a, flow.covariances, a).sqrt()
    return 0.5 * torch.erfc((c - mean) / (std * math.sqrt(2)))


def tilted_mode_weights(flow: AnalyticGMMFlow, a: torch.Tensor, c: float, lam: float) -> torch.Tensor:
    """π̃_k ∝ π_k (e^λ Φ_k + 1 - Φ_k)."""
    phi = region_mass(flow, a, c)
    w = flow.weights * (math.exp(lam) * phi + 1 - phi)
    return w / w.sum()


def tilted_samples(flow: AnalyticGMMFlow, a, c, lam: float, n: int, seed: int = 123) -> torch.Tensor:
    """Exact samples of p̃: prior samples accepted with probability exp(λ (r - 1)) (r <= 1)."""
    generator, kept = torch.Generator().manual_seed(seed), []
    while sum(len(k) for k in kept) < n:
        x = flow.sample_prior(200_000, generator, dtype=torch.float64).reshape(-1, 2)
        r = (x @ a > c).double()
        keep = torch.rand(len(x), generator=generator, dtype=torch.float64) < torch.exp(lam * (r - 1))
        kept.append(x[keep])
    return torch.cat(kept)[:n]


def _cells(flow: AnalyticGMMFlow, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Distribution over the 2K cells (most likely prior component, r)."""
    component = flow.prior.responsibilities(x).argmax(1)
    cell = component * 2 + inside.long()
    return torch.bincount(cell, minlength=2 * flow.n_components).double() / len(x)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equally sized point sets (random directions, sorted projections)."""
    d = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = d / d.norm(dim=0)
    px, py = (x @ d).sort(0).values, (y @ d).sort(0).values
    return float((px - py).square().mean().sqrt())


def mean_pairwise_distance(x: torch.Tensor) -> float:
    return float(torch.cdist(x, x).sum() / (len(x) * (len(x) - 1)))


def mixture_rows(outputs: int, k: int, steps: int, lam: float, options: dict, seed: int) -> tuple[list[Row], dict]:
    flow, a, c = mixture_problem()
    hard = CallableObjective(lambda x: -(x.flatten(1).double() @ a > c).to(x.dtype), space="latent")
    # the same indicator as a value, with a sigmoid surrogate gradient (straight-through) for FlowChef
    surrogate = CallableObjective(lambda x: -threshold(x.flatten(1) @ a.to(x) - c, temperature=0.25), space="latent")
    exact = tilted_samples(flow, a, c, lam, outputs)
    reference = tilted_samples(flow, a, c, lam, 200_000, seed=7)
    exact_cells = _cells(flow, reference, reference @ a > c)
    runs = [("unguided", "unguided", {}, steps, hard),
            (f"best_of_n N={k}", "best_of_n", {"candidates": k}, steps, hard),
            (f"particles K={k} (best)", "particles", {"particles": k, **options}, steps, hard),
            (f"particles K={k} (sample)", "particles", {"particles": k, **options, "select": "sample"}, steps, hard),
            (f"flowchef, {k * steps} steps", "flowchef", {"step_size": 0.5}, k * steps, surrogate)]
    rows = []
    for name, method, opts, n_steps, objective in runs:
        begin = time.perf_counter()
        out = get_method(method, **opts)(flow, objective, num_steps=n_steps, batch_size=outputs, progress=False,
                                         generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - begin
        x = out.x.reshape(outputs, 2).double()
        inside = x @ a > c
        rows.append(Row("gaussian mixture", name, float(inside.double().mean()),
                        float(0.5 * (_cells(flow, x, inside) - exact_cells).abs().sum()), sliced_w2(x, exact),
                        mean_pairwise_distance(x), out.nfe, seconds))
    target = {"reward": float((reference @ a > c).double().mean()), "diversity": mean_pairwise_distance(exact),
              "distance_floor": sliced_w2(tilted_samples(flow, a, c, lam, outputs, seed=11), exact),
              "mode_weights": [round(float(w), 4) for w in tilted_mode_weights(flow, a, c, lam)]}
    return rows, target


def particle_sweep(outputs: int, ks: list[int], steps: int, lam: float, options: dict, seed: int,
                   selects: tuple[str, ...] = ("best", "sample")) -> tuple[list[dict], dict]:
    """Particles on the Gaussian mixture for each K in ``ks`` and each ``select``: the mean reward, the cell TV
    and sliced W2 to the exact p̃ ∝ p exp(λ r), and the mean final ESS. The B·K particles of one call are at most
    4096 (the toolkit's batch limit), so large K runs in chunks of outputs (chunk c seeded ``seed + c``)."""
    flow, a, c = mixture_problem()
    hard = CallableObjective(lambda x: -(x.flatten(1).double() @ a > c).to(x.dtype), space="latent")
    exact = tilted_samples(flow, a, c, lam, outputs)
    reference = tilted_samples(flow, a, c, lam, 200_000, seed=7)
    exact_cells = _cells(flow, reference, reference @ a > c)
    rows = []
    for k in ks:
        for select in selects:
            run = get_method("particles", particles=k, temperature=lam, select=select, **options)
            xs, final_ess, chunk = [], [], max(1, 4096 // k)
            for chunk_index, start in enumerate(range(0, outputs, chunk)):
                out = run(flow, hard, num_steps=steps, batch_size=min(chunk, outputs - start), progress=False,
                          generator=torch.Generator().manual_seed(seed + chunk_index))
                xs.append(out.x.reshape(-1, 2).double())
                final_ess.append(out.info["final_ess"])
            x = torch.cat(xs)
            inside = x @ a > c
            rows.append({"K": k, "select": select, "reward": float(inside.double().mean()),
                         "cell_tv": float(0.5 * (_cells(flow, x, inside) - exact_cells).abs().sum()),
                         "distance": sliced_w2(x, exact), "final_ess": float(torch.cat(final_ess).mean())})
    floor = tilted_samples(flow, a, c, lam, outputs, seed=11)
    target = {"reward": float((reference @ a > c).double().mean()),
              "cell_tv_floor": float(0.5 * (_cells(flow, floor, floor @ a > c) - exact_cells).abs().sum()),
              "distance_floor": sliced_w2(floor, exact)}
    return rows, target


def sweep_markdown(rows: list[dict], target: dict) -> str:
    lines = ["| K | select | mean reward | cell TV to p̃ | distance to p̃ | final ESS |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['select']} | {r['reward']:.3f} | {r['cell_tv']:.3f} | {r['distance']:.3f} | "
                     f"{r['final_ess']:.1f} |")
    lines.append(f"| exact p̃ | | {target['reward']:.3f} | {target['cell_tv_floor']:.3f} (floor) | "
                 f"{target['distance_floor']:.3f} (floor) | |")
    return "\n".join(lines)


# -- the categorical mixture ---------------------------------------------------------------------------------
def sequence_rows(outputs: int, k: int, steps: int, lam: float, options: dict, seed: int, motif: str,
                  length: int = 8) -> tuple[list[Row], dict]:
    flow = load_sequence_flow(f"analytic:length={length}", len(ALPHABET))
    count = motif_score([ALPHABET.index(ch) for ch in motif])

    def reward(h: torch.Tensor) -> torch.Tensor:  # 1[motif occurs]; its gradient that of the count (if < 1)
        return count(h).clamp(max=1.0)

    objective = CallableObjective(lambda h: -reward(h), space="latent")
    everything = torch.tensor(list(itertools.product(range(len(ALPHABET)), repeat=length)))
    log_p = flow.prior.log_prob(everything)
    r_all = reward(F.one_hot(everything, len(ALPHABET)).double())
    log_tilted = log_p + lam * r_all
    tilted = torch.softmax(log_tilted, 0)
    components = _sequence_components(flow, everything)
    cells = components * 2 + r_all.long()
    exact_cells = torch.zeros(2 * flow.prior.weights.shape[0], dtype=torch.float64).index_add_(0, cells, tilted)
    exact_marginals = torch.einsum("n,nlk->lk", tilted, F.one_hot(everything, len(ALPHABET)).double())
    exact_hamming = float((1 - exact_marginals.square().sum(-1)).sum())
    runs = [("unguided", "unguided_sequences", {}, steps),
            (f"best_of_n N={k}", "best_of_n", {"candidates": k}, steps),
            (f"particles K={k} (best)", "particles", {"particles": k, **options}, steps),
            (f"particles K={k} (sample)", "particles", {"particles": k, **options, "select": "sample"}, steps),
            (f"straight_through, {k * steps} steps", "straight_through", {"gamma": 2.0}, k * steps)]
    rows = []
    for name, method, opts, n_steps in runs:
        begin = time.perf_counter()
        if method == "unguided_sequences":
            unguided = get_method("straight_through", gamma=0.0)
            out = unguided(flow, objective, num_steps=n_steps, batch_size=outputs, progress=False,
                           generator=torch.Generator().manual_seed(seed))
        else:
            out = get_method(method, **opts)(flow, objective, num_steps=n_steps, batch_size=outputs, progress=False,
                                             generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - begin
        tokens = out.info["tokens"]
        hard = F.one_hot(tokens, len(ALPHABET)).double()
        r = reward(hard)
        cell = _sequence_components(flow, tokens) * 2 + r.long()
        empirical = torch.bincount(cell, minlength=len(exact_cells)).double() / outputs
        marginals = hard.mean(0)
        differ = (tokens[:, None] != tokens[None]).double().sum(-1)
        rows.append(Row("categorical mixture", name, float(r.mean()),
                        float(0.5 * (empirical - exact_cells).abs().sum()),
                        float(0.5 * (marginals - exact_marginals).abs().sum(-1).mean()),
                        float(differ.sum() / (outputs * (outputs - 1))), out.nfe, seconds))
    # the floor of the per-position distance for this many exact samples
    draws = torch.multinomial(tilted, outputs, replacement=True, generator=torch.Generator().manual_seed(5))
    floor = F.one_hot(everything[draws], len(ALPHABET)).double().mean(0)
    target = {"reward": float((tilted * r_all).sum()), "diversity": exact_hamming,
              "distance_floor": float(0.5 * (floor - exact_marginals).abs().sum(-1).mean()),
              "prior_reward": float((log_p.exp() * r_all).sum())}
    return rows, target


def _sequence_components(flow, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) the most likely mixture component of each sequence."""
    log_probs = flow.prior.probs.clamp_min(1e-300).log()  # (C, L, K)
    per = log_probs[:, torch.arange(tokens.shape[1])[None], tokens]  # (C, n, L)
    return (flow.prior.weights.log()[:, None] + per.sum(-1)).argmax(0)


# -- the default model ---------------------------------------------------------------------------------------
def default_model_rows(outputs: int, k: int, steps: int, lam: float, options: dict, seed: int,
                       label: str | int = 0) -> list[Row]:
    """Bundled classifier's hard decision for ``label`` as the reward (-1/0 loss, no gradient); judged by it."""
    from guidance import DecisionObjective, load_model
    from guidance.features.rewards import classifier_source, load_classifier, resolve_label

    model = load_model("default")
    classifier = load_classifier(classifier_source("default"))
    index = resolve_label(label, classifier.names)
    objective = DecisionObjective(classifier.logits, index, num_classes=classifier.num_classes)
    rows = []
    for name, method, opts in [("unguided", "unguided", {}), (f"best_of_n N={k}", "best_of_n", {"candidates": k}),
                               (f"particles K={k} (best)", "particles", {"particles": k, **options})]:
        begin = time.perf_counter()
        out = get_method(method, **opts)(model, objective, num_steps=steps, batch_size=outputs, progress=False,
                                         generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - begin
        with torch.no_grad():
            decided = classifier.logits(out.image.clamp(-1, 1)).argmax(1) == index
        rows.append(Row(f"default model ({classifier.names[index] if classifier.names else index})", name,
                        float(decided.double().mean()), math.nan, math.nan, math.nan, out.nfe, seconds))
    return rows


# -- report --------------------------------------------------------------------------------------------------
def markdown(rows: list[Row], targets: dict) -> str:
    lines = ["| prior | method | mean reward | cell TV to p̃ | distance to p̃ | diversity | NFE | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{v:.3f}" if not math.isnan(v) else "–" for v in (r.reward, r.cell_tv, r.distance, r.diversity)]
        lines.append(f"| {r.prior} | {r.method} | {' | '.join(cells)} | {r.nfe} | {r.seconds:.1f} |")
    for prior, t in targets.items():
        lines.append(f"| {prior} | exact p̃ | {t['reward']:.3f} | 0 | {t['distance_floor']:.3f} (floor) | "
                     f"{t['diversity']:.3f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.studies.particle_benchmark",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--outputs", type=int, default=512, help="outputs per method (default 512)")
    parser.add_argument("--particles", type=int, default=8, help="K = best-of-N's N (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps N (default 20)")
    parser.add_argument("--temperature", type=float, default=10.0, help="λ of the target p exp(λ r) (default 10)")
    parser.add_argument("--every", type=int, default=1, help="particles: resample every this many steps (default 1)")
    parser.add_argument("--noise-scale", type=float, default=4.0, help="particles: the SDE's η (default 4)")
    parser.add_argument("--motif", default="GAT", help="sequences: the motif whose presence is the reward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-model", action="store_true",
                        help="also run the default model with its bundled classifier's hard decision (slow on CPU)")
    parser.add_argument("--default-outputs", type=int, default=64,
                        help="images of the default-model run (default 64; fewer is faster but noisier)")
    parser.add_argument("--sweep", metavar="K,K,...",
                        help="instead: particles on the Gaussian mixture for these K (e.g. 4,8,16,32,64), select "
                             "best and sample, against the exact p̃ at --temperature")
    parser.add_argument("--potential", default="difference", help="particles: the potential (default difference)")
    parser.add_argument("--ess-threshold", type=float, help="particles: resample below this ESS / K (default: always)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    options = {"temperature": args.temperature, "every": args.every, "noise_scale": args.noise_scale,
               "potential": args.potential, "ess_threshold": args.ess_threshold}
    if args.sweep:
        if args.default_model:
            parser.error("--default-model does nothing with --sweep (the sweep runs on the Gaussian mixture only)")
        options.pop("temperature")
        ks = [int(k) for k in args.sweep.split(",")]
        found, target = particle_sweep(args.outputs, ks, args.steps, args.temperature, options, args.seed)
        print(sweep_markdown(found, target))
        if args.json:
            write_text_atomic(args.json, json.dumps({"rows": found, "target": target}, indent=2))
        return 0
    rows, targets = [], {}
    found, targets["gaussian mixture"] = mixture_rows(args.outputs, args.particles, args.steps, args.temperature,
                                                      options, args.seed)
    rows += found
    found, targets["categorical mixture"] = sequence_rows(args.outputs, args.particles, args.steps, args.temperature,
                                                          options, args.seed, args.motif)
    rows += found
    if args.default_model:
        rows += default_model_rows(args.default_outputs, 4, 10, args.temperature, options, args.seed)
    print(markdown(rows, targets))
    if args.json:
        write_text_atomic(args.json, json.dumps({"rows": [asdict(r) for r in rows], "targets": targets}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
