"""Design sequences with straight-through guidance: fit a simplex flow and two classifiers to clean sequences,
then guide the flow with one classifier and check the result with the other.

The data set is generated here: DNA-like sequences of length 12 over ACGT on a biased background, each carrying
one of three motifs at a random position; the class of a sequence is its motif. The classifiers only ever see
clean one-hot sequences; guidance feeds them hard samples, never soft states.

    python demos/design_sequences.py [--target 2] [--train-steps 500] [--num 256] [--gamma 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guidance import (ClassifierObjective, get_method, sample_sequences, train_sequence_classifier,  # noqa: E402
                      train_simplex_flow)
from tasks import decode_sequences as decode  # noqa: E402

ALPHABET = "ACGT"
LENGTH = 12
MOTIFS = ["ACGT", "TTAA", "GAGC"]
BACKGROUND = torch.tensor([0.4, 0.3, 0.2, 0.1])


def motif_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L) tokens on the background with one motif each at a random position, and the motif index."""
    tokens = torch.multinomial(BACKGROUND, n * LENGTH, replacement=True, generator=generator).reshape(n, LENGTH)
    label = torch.randint(len(MOTIFS), (n,), generator=generator)
    start = torch.randint(LENGTH - 3, (n,), generator=generator)
    motifs = torch.tensor([[ALPHABET.index(c) for c in m] for m in MOTIFS])
    tokens.scatter_(1, start[:, None] + torch.arange(4), motifs[label])
    return tokens, label


def carries(sequences: list[str], motif: str) -> float:
    return sum(motif in s for s in sequences) / len(sequences)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--target", type=int, default=2, choices=range(len(MOTIFS)), help="motif class to design")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--num", type=int, default=256, help="sequences to generate")
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)

    tokens, label = motif_data(4096, g)
    print(f"training a simplex flow ({args.train_steps} steps) and two classifiers on 4096 sequences",
          flush=True)  # flushed: a slow run shows where it is at once
    flow, losses = train_simplex_flow(tokens, len(ALPHABET), steps=args.train_steps, generator=g, progress=True)
    print(f"simplex flow: endpoint loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}", flush=True)
    guide, _ = train_sequence_classifier(tokens[:2048], label[:2048], len(ALPHABET), generator=g, progress=False)
    judge, _ = train_sequence_classifier(tokens[2048:], label[2048:], len(ALPHABET), width=32, generator=g,
                                         progress=False)  # independent: other data, other size, other seed

    objective = ClassifierObjective(guide, args.target, space="latent")
    steer = get_method("straight_through", gamma=args.gamma, samples=8)
    guided = steer(flow, objective, num_steps=50, batch_size=args.num, progress=False,
                   generator=torch.Generator().manual_seed(args.seed))
    plain = sample_sequences(flow, 50, batch_size=args.num, progress=False,
                             generator=torch.Generator().manual_seed(args.seed))

    motif = MOTIFS[args.target]
    with torch.no_grad():
        judged = {name: (judge(torch.nn.functional.one_hot(t, 4).float()).argmax(1) == args.target).float().mean()
                  for name, t in (("unguided", plain.tokens), ("guided", guided.info["tokens"]))}
    for name, t in (("unguided", plain.tokens), ("guided", guided.info["tokens"])):
        print(f"{name:>9}: {carries(decode(t, ALPHABET), motif):6.1%} carry {motif}, "
              f"{judged[name].item():6.1%} judged class {args.target} by the independent classifier", flush=True)
    curve = (-guided.info["loss"].mean(1)).exp()  # mean p(target | hard samples) per step
    print("p(target) of the hard samples per step: " + " ".join(f"{v:.2f}" for v in curve[::5].tolist()), flush=True)
    with torch.no_grad():
        confidence = guide(torch.nn.functional.one_hot(guided.info["tokens"], 4).float()).softmax(1)[:, args.target]
    print("best designed sequences:", flush=True)
    for index in confidence.argsort(descending=True)[:5].tolist():
        print(f"  {decode(guided.info['tokens'][index:index + 1], ALPHABET)[0]}  p = {confidence[index]:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
