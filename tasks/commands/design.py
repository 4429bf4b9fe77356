"""Sequence design: guide a simplex flow toward a scoring function with straight-through guidance.

    flowsteer design --flow analytic --score motif:GATA --alphabet ACGT
    flowsteer design --train my_sequences.txt --score mypackage.scores:stability --alphabet ACDEFGHIKLMNPQRSTVWY

A score maps hard one-hot sequences (B, L, K) to (B,) values, higher is better, and must be differentiable in its
input (a motif count written as products of one-hot entries, a small classifier's log-probability, a regressor);
straight-through guidance feeds it hard samples only, so it never sees a soft state. ``--method particles``
(particle search, :mod:`guidance.methods.particles`) and ``--method best_of_n`` only evaluate the score, so any
score works with them, differentiable or not.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from guidance import AnalyticSimplexFlow, CategoricalMixture, RewardObjective, SimplexFlow, get_method
from guidance.loading.files import write_text_atomic
from operators.checks import MAX_BATCH, MAX_ITERATIONS, check_int, check_number, check_seed

__all__ = ["DESIGN_METHODS", "DesignResult", "decode", "design", "encode", "load_score", "load_sequence_flow",
           "motif_score", "read_sequences"]


#: The methods `flowsteer design` runs: straight-through guidance (gradients through hard samples), particle search
#: and best-of-N (the score is only evaluated).
DESIGN_METHODS = ("straight_through", "particles", "best_of_n")


def motif_score(motif: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Occurrences of ``motif`` (token indices): sum_p prod_j h[:, p + j, motif_j]. On one-hot rows it counts the
    motif exactly; it is a polynomial in h, so its gradient is defined on any input."""
    motif = [int(t) for t in motif]
    if not motif:
        raise ValueError("the motif is empty: give at least one token")

    def score(h: torch.Tensor) -> torch.Tensor:
        span = h.shape[1] - len(motif) + 1
        if span < 1:
            raise ValueError(f"the motif of length {len(motif)} is longer than the sequences ({h.shape[1]})")
        hits = torch.ones(h.shape[0], span, dtype=h.dtype, device=h.device)
        for j, token in enumerate(motif):
            hits = hits * h[:, j:j + span, token]
        return hits.sum(1)

    return score


def check_alphabet(alphabet: str) -> str:
    """A vocabulary of one letter per token: non-empty, no letter twice (a repeat would score two tokens as one)."""
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"the alphabet (--alphabet) must be a non-empty string of letters, got {alphabet!r}")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"the alphabet {alphabet!r} repeats {', '.join(map(repr, repeated))}: one letter per token "
                         f"(--alphabet {''.join(dict.fromkeys(alphabet))})")
    return alphabet


def check_num(num_sequences) -> int:
    return check_int(num_sequences, "the number of sequences (--num)", 1, MAX_BATCH)


def check_gamma(gamma) -> float:
    """The guidance scale: a finite number >= 0 (0: unguided)."""
    return check_number(gamma, "the guidance scale --gamma", minimum=0,
                        fix="use a scale such as --gamma 2 (0 samples without guidance)")


def check_score(score: Callable, flow: SimplexFlow, name: str) -> None:
    """One look at the score before any run, on the all-first-letter sequence and three random ones: it must
    return one finite number per sequence (a string or NaN is refused in one line naming it). A score that fails
    to run on them is left to the method, which says why."""
    from guidance.objectives import check_reward_finite, reward_values

    tokens = torch.cat([torch.zeros(1, flow.length, dtype=torch.long),
                        torch.randint(flow.vocab_size, (3, flow.length), generator=torch.Generator().manual_seed(0))])
    hard = torch.nn.functional.one_hot(tokens, flow.vocab_size).float().to(flow.device)
    try:
        with torch.no_grad():
            values = score(hard)
    except Exception:  # noqa: BLE001 - a probe only
        return
    check_reward_finite(reward_values(values, hard.shape[0], name, "sequence"), name, "sequence")


def encode(sequences: Sequence[str], alphabet: str) -> torch.Tensor:
    """Strings over ``alphabet`` of one length -> (N, L) token indices."""
    check_alphabet(alphabet)
    index = {c: i for i, c in enumerate(alphabet)}
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"all sequences must have one length, got lengths {sorted(lengths)[:5]}")
    rows = []
    for n, s in enumerate(sequences):
        unknown = sorted(set(s) - set(index))
        if unknown:
            raise ValueError(f"sequence {n + 1} has letters {unknown} outside the alphabet {alphabet!r}; pass the "
                             f"full alphabet with --alphabet")
        rows.append([index[c] for c in s])
    return torch.tensor(rows, dtype=torch.long)


def decode(tokens: torch.Tensor, alphabet: str) -> list[str]:
    """(N, L) token indices -> strings."""
    return ["".join(alphabet[int(t)] for t in row) for row in tokens]


def read_sequences(path: str | Path, alphabet: str) -> torch.Tensor:
    """One sequence per line (blank lines and lines starting with '#' or '>' skipped) -> (N, L) tokens."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read sequences from {str(path)!r}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    sequences = [line for line in lines if line and not line.startswith(("#", ">"))]
    if not sequences:
        raise ValueError(f"{str(path)!r} holds no sequences (one per line expected)")
    return encode(sequences, alphabet)


def load_sequence_flow(spec: str, vocab_size: int) -> SimplexFlow:
    """``"analytic[:length=12,components=3,seed=0]"`` (a random categorical-mixture prior, exact posterior) or a
    folder written by :meth:`NetworkSimplexFlow.save`."""
    name, _, options = spec.partition(":")
    if name == "analytic":
        settings = {"length": 12, "components": 3, "seed": 0}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in settings:
                raise ValueError(f"analytic flow option {key!r} unknown; use {sorted(settings)}")
            settings[key] = int(value)
        prior = CategoricalMixture.random(settings["components"], settings["length"], vocab_size,
                                          generator=torch.Generator().manual_seed(settings["seed"]))
        return AnalyticSimplexFlow(prior)
    if Path(spec).is_dir():
        from guidance.sequences.network import NetworkSimplexFlow

        flow = NetworkSimplexFlow.load(spec)
        if flow.vocab_size != vocab_size:
            raise ValueError(f"the flow in {spec!r} has a vocabulary of {flow.vocab_size} tokens but the alphabet "
                             f"has {vocab_size} letters")
        return flow
    raise ValueError(f"unknown sequence flow {spec!r}: use 'analytic[:length=..,components=..,seed=..]' or a folder "
                     f"saved by NetworkSimplexFlow.save (or --train FILE to fit one)")


def load_score(spec: str, alphabet: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``"motif:GATA"`` (occurrences of a motif over the alphabet) or ``"module:function"`` (any Python callable
    on one-hot sequences (B, L, K) -> (B,), higher is better)."""
    kind, _, rest = spec.partition(":")
    if kind == "motif":
        unknown = sorted(set(rest) - set(alphabet))
        if not rest or unknown:
            raise ValueError(f"the motif {rest!r} must be a non-empty string over the alphabet {alphabet!r}")
        return motif_score([alphabet.index(c) for c in rest])
    if not rest:
        close = difflib.get_close_matches(kind, ["motif"], n=1)
        hint = " (did you mean 'motif:...'?)" if close else ""
        raise ValueError(f"unknown score {spec!r}{hint}: use 'motif:LETTERS' or 'module:function'")
    from guidance.features.rewards import import_callable

    return import_callable(spec, "score")


@dataclass
class DesignResult:
    """Designed ``sequences`` (best first) with their ``scores``, the guided run's mean ``curve`` of hard-sample
    scores per step, the mean score of unguided and guided samples from the same seed, and the ``settings`` that
    reproduce the run (`flowsteer design` adds the flow, score and alphabet)."""

    sequences: list[str]
    scores: list[float]
    curve: list[float]
    unguided_mean: float
    guided_mean: float
    seconds: float
    settings: dict = field(default_factory=dict)


def design(flow: SimplexFlow, score: Callable[[torch.Tensor], torch.Tensor], alphabet: str, *, num_sequences: int = 64,
           num_steps: int = 50, gamma: float = 2.0, samples: int = 8, source: str = "endpoint", draw: str = "sample",
           seed: int = 0, progress: bool = True, method: str = "straight_through",
           particles: int = 8, score_name: str | None = None) -> DesignResult:
    """Generate ``num_sequences`` with ``method`` toward high ``score`` (and as many unguided from the same seed, for
    comparison); return them sorted by score. straight_through uses ``gamma``, ``samples``, ``source`` and
    ``draw``; particles runs ``particles`` (K) particles per sequence and best_of_n as many candidates, both at K
    times the flow evaluations of one sequence. ``score_name`` names the score in messages (its spec)."""
    check_alphabet(alphabet)
    check_num(num_sequences)
    check_seed(seed, "the seed (--seed)")
    check_gamma(gamma)
    if method not in DESIGN_METHODS:
        raise ValueError(f"design runs one of {', '.join(DESIGN_METHODS)}, not {method!r}")
    if len(alphabet) != flow.vocab_size:
        raise ValueError(f"the alphabet has {len(alphabet)} letters but the flow's vocabulary has {flow.vocab_size}")
    name = f"the score {score_name or getattr(score, '__name__', type(score).__name__)!r}"
    check_score(score, flow, name)
    objective = RewardObjective(score, space="latent", name=name)
    if method == "straight_through":
        run = get_method("straight_through", gamma=gamma, samples=samples, source=source, draw=draw)
        settings = {"gamma": gamma, "samples": samples, "source": source, "draw": draw}
    elif method == "particles":
        run = get_method("particles", particles=particles)
        settings = {"particles": particles}
    else:
        run = get_method("best_of_n", candidates=particles)
        settings = {"candidates": particles}
    begin = time.perf_counter()
    guided = run(flow, objective, num_steps=num_steps, batch_size=num_sequences, progress=progress,
                 generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - begin
    unguided = get_method("straight_through", gamma=0.0)(flow, objective, num_steps=num_steps, progress=False,
                                                         batch_size=num_sequences,
                                                         generator=torch.Generator().manual_seed(seed))

    def hard_scores(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return score(torch.nn.functional.one_hot(tokens, flow.vocab_size).float()).float()

    values = hard_scores(guided.info["tokens"])
    order = values.argsort(descending=True)
    if method == "straight_through":
        curve = (-guided.info["loss"].mean(1)).tolist()
    elif method == "particles":
        curve = list(guided.info["mean_reward"])  # the particles' mean score at each resampling
    else:
        curve = []
    return DesignResult(sequences=decode(guided.info["tokens"][order], alphabet), scores=values[order].tolist(),
                        curve=curve, unguided_mean=hard_scores(unguided.info["tokens"]).mean().item(),
                        guided_mean=values.mean().item(), seconds=seconds,
                        settings={"alphabet": alphabet, "num": num_sequences, "steps": num_steps, "method": method,
                                  **settings, "seed": seed})


def save_result(result: DesignResult, path: str | Path, overwrite: bool = False) -> Path:
    """Write the result as JSON atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} already exists; pass --overwrite to replace it")
    return write_text_atomic(path, json.dumps(asdict(result), indent=2))


# -- `flowsteer design` ---------------------------------------------------------------------------
def _sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(bars[min(7, int((v - low) / span * 8))] for v in values)


def _rerun_settings(args: argparse.Namespace) -> dict:
    """What the saved result records besides :func:`design`'s settings, to rerun it: the flow (its spec, a folder
    as an absolute path, or the training file and steps), the score spec and the alphabet."""
    if args.train:
        flow = {"flow": None, "train": str(Path(args.train).resolve()), "train_steps": args.train_steps,
                "save_flow": str(Path(args.save_flow).resolve()) if args.save_flow else None}
    else:
        flow = {"flow": str(Path(args.flow).resolve()) if Path(args.flow).is_dir() else args.flow}
    return {**flow, "score": args.score, "alphabet": args.alphabet}


def run(args: argparse.Namespace) -> int:
    """Guide a simplex flow toward a score with straight-through guidance; print the best sequences."""
    alphabet = check_alphabet(args.alphabet)
    score = load_score(args.score, alphabet)
    check_num(args.num)  # before any training or sampling
    check_gamma(args.gamma)
    if not args.train:
        for flag, value in (("--train-steps", args.train_steps), ("--save-flow", args.save_flow)):
            if value is not None:
                raise ValueError(f"{flag} {value} does nothing without --train FILE (only a flow fitted to FILE is "
                                 f"trained and saved; --flow {args.flow!r} is used as it is): add --train FILE, or "
                                 f"drop {flag}")
    else:
        args.train_steps = 500 if args.train_steps is None else check_int(
            args.train_steps, "the training steps (--train-steps)", 1, MAX_ITERATIONS * 10,
            fix="0 steps would leave the flow untrained; the default is 500")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out!r} already exists; pass --overwrite to replace it")
    if args.out:  # before any training or sampling: the folder must take the file
        from ..outputs.folders import check_writable

        check_writable(Path(args.out).parent, "--out", "the folder of --out")
    if args.train:
        from guidance.sequences.network import train_simplex_flow

        sequences = read_sequences(args.train, alphabet)
        print(f"training a simplex flow on {len(sequences)} sequences of length {sequences.shape[1]} "
              f"({args.train_steps} steps)", file=sys.stderr)
        flow, _ = train_simplex_flow(sequences, len(alphabet), steps=args.train_steps, progress=not args.quiet,
                                     generator=torch.Generator().manual_seed(args.seed))
        if args.save_flow:
            flow.save(args.save_flow)
    else:
        flow = load_sequence_flow(args.flow, len(alphabet))
    result = design(flow, score, alphabet, num_sequences=args.num, num_steps=args.steps, gamma=args.gamma,
                    samples=args.samples, source=args.source, draw=args.draw, seed=args.seed,
                    progress=not args.quiet, method=args.method, particles=args.particles, score_name=args.score)
    print(f"mean score: unguided {result.unguided_mean:.3f} -> guided {result.guided_mean:.3f} "
          f"({args.num} sequences, {args.method}, {result.seconds:.1f} s)")
    if result.curve:
        what = ("of the hard samples per step" if args.method == "straight_through"
                else "of the particles per resampling")
        print(f"score {what}: {_sparkline(result.curve)}  {result.curve[0]:.3f} -> {result.curve[-1]:.3f}")
    for sequence, value in list(zip(result.sequences, result.scores))[: args.top]:
        print(f"{value:8.3f}  {sequence}")
    if args.out:
        result.settings.update(_rerun_settings(args))
        save_result(result, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    return 0



def add_parser(commands) -> None:
    design = commands.add_parser("design", help="guide a simplex flow over sequences toward a score",
                                 description="Generate sequences with straight-through guidance toward a score "
                                             "(higher is better) and print the best ones.")
    source = design.add_mutually_exclusive_group()
    source.add_argument("--flow", default="analytic",
                        help="'analytic[:length=12,components=3,seed=0]' (a random exact prior) or a folder saved by "
                             "NetworkSimplexFlow.save (default: analytic)")
    source.add_argument("--train", metavar="FILE", help="fit a simplex flow to the sequences in FILE (one per line)")
    design.add_argument("--train-steps", type=int, help="training steps with --train (default 500)")
    design.add_argument("--save-flow", metavar="DIR", help="with --train: save the fitted flow to DIR")
    design.add_argument("--score", required=True, help="'motif:LETTERS' or 'module:function' on one-hot sequences")
    design.add_argument("--alphabet", default="ACGT", help="the vocabulary, one letter per token (default ACGT)")
    design.add_argument("--num", type=int, default=64, help="sequences to generate (default 64)")
    design.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    design.add_argument("--method", choices=DESIGN_METHODS, default="straight_through",
                        help="straight_through (gradients through hard samples, default), particles (particle "
                             "search: the score is only evaluated) or best_of_n")
    design.add_argument("--particles", type=int, default=8,
                        help="particles per sequence with --method particles, candidates with best_of_n (default 8)")
    design.add_argument("--gamma", type=float, default=2.0, help="guidance scale (default 2.0)")
    design.add_argument("--samples", type=int, default=8, help="M, hard samples per step (default 8)")
    design.add_argument("--source", choices=("endpoint", "state"), default="endpoint",
                        help="draw hard samples from the predicted endpoint or the current state (default endpoint)")
    design.add_argument("--draw", choices=("sample", "argmax"), default="sample", help="categorical draws or argmax")
    design.add_argument("--seed", type=int, default=0)
    design.add_argument("--top", type=int, default=10, help="how many of the best sequences to print (default 10)")
    design.add_argument("--out", help="also write all sequences, scores, the score curve and the settings (all "
                                      "that reruns it) to this JSON file")
    design.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    design.add_argument("--quiet", action="store_true", help="no progress bars")
    design.set_defaults(run=run)
