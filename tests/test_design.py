"""Sequence design: motif scores, sequence text I/O, the design job and `flowsteer design`."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from tasks.commands import design as tasks_design
from tasks.commands.cli import main

ALPHABET = "ACGT"


def _count(sequence: str, motif: str) -> int:
    return sum(sequence[i:i + len(motif)] == motif for i in range(len(sequence) - len(motif) + 1))


def test_motif_score_counts_overlapping_occurrences_on_one_hots():
    sequences = ["GATGATAAGA", "AAAAAAAAAA", "GAGAGAGATT", "TTTTTTTGAT"]
    tokens = tasks_design.encode(sequences, ALPHABET)
    assert tasks_design.decode(tokens, ALPHABET) == sequences
    for motif in ("GAT", "AA", "GAGA"):
        score = tasks_design.load_score(f"motif:{motif}", ALPHABET)
        counts = score(F.one_hot(tokens, 4).float())
        assert counts.tolist() == [_count(s, motif) for s in sequences]


def test_motif_score_has_a_gradient_on_one_hots():
    h = F.one_hot(tasks_design.encode(["GACGAC"], ALPHABET), 4).float().requires_grad_(True)
    (g,) = torch.autograd.grad(tasks_design.motif_score([2, 0, 3]).__call__(h).sum(), h)
    assert g[0, 2, 3] == 1  # completing "GA?" with T at position 2 would add one occurrence


def test_design_raises_the_motif_count():
    flow = tasks_design.load_sequence_flow("analytic", 4)
    result = tasks_design.design(flow, tasks_design.load_score("motif:GAT", ALPHABET), ALPHABET, num_sequences=128,
                                 gamma=3.0, progress=False)
    assert result.guided_mean > result.unguided_mean + 0.8
    assert result.scores == sorted(result.scores, reverse=True)
    assert result.scores[0] == _count(result.sequences[0], "GAT")
    assert len(result.curve) == 50 and result.curve[-1] > result.curve[0]


def test_cli_design_prints_the_best_sequences_and_writes_json(tmp_path, capsys):
    out = tmp_path / "design.json"
    assert main(["design", "--score", "motif:GAT", "--num", "32", "--quiet", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"mean score: unguided [\d.]+ -> guided [\d.]+", printed)
    best = re.findall(r"^\s+([\d.]+)\s+([ACGT]{12})$", printed, flags=re.M)
    assert len(best) == 3 and float(best[0][0]) == _count(best[0][1], "GAT")
    saved = json.loads(out.read_text())
    assert len(saved["sequences"]) == 32 and len(saved["curve"]) == 50
    # never overwritten without --overwrite, and the file is left as it was
    before = out.read_bytes()
    assert main(["design", "--score", "motif:GAT", "--num", "4", "--quiet", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_cli_design_trains_a_flow_on_a_sequence_file(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    background = torch.randint(4, (300, 8), generator=generator)
    background[:, 2:5] = torch.tensor([2, 0, 3])  # every training sequence carries GAT at positions 2-4
    data = tmp_path / "train.txt"
    data.write_text("# toy sequences\n" + "\n".join(tasks_design.decode(background, ALPHABET)) + "\n")
    saved = tmp_path / "flow"
    assert main(["design", "--train", str(data), "--train-steps", "150", "--save-flow", str(saved),
                 "--score", "motif:GAT", "--num", "16", "--quiet", "--top", "16"]) == 0
    printed = capsys.readouterr().out
    sequences = re.findall(r"^\s+[\d.]+\s+([ACGT]{8})$", printed, flags=re.M)
    assert len(sequences) == 16
    assert sum(_count(s, "GAT") >= 1 for s in sequences) >= 12
    assert main(["design", "--flow", str(saved), "--score", "motif:GAT", "--num", "4", "--quiet"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--score", "motif:GAX"], "must be a non-empty string over the alphabet"),
    (["--score", "motiff"], "did you mean 'motif:...'"),
    (["--score", "nosuchmodule:f"], "cannot import the score"),
    (["--score", "motif:GA", "--flow", "nosuchflow"], "unknown sequence flow"),
    (["--score", "motif:GA", "--train", "missing.txt"], "no such file"),
    (["--score", "motif:GA", "--samples", "0"], "samples \\(M\\) must be an integer >= 1"),
    (["--score", "motif:GA", "--gamma", "-1"], "gamma must be a number >= 0"),
])
def test_cli_design_bad_input(argv, message, capsys):
    assert main(["design", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowsteer: error:") and re.search(message, err)


def test_sequences_outside_the_alphabet_are_named(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("ACGT\nACGU\n")
    with pytest.raises(ValueError, match=r"sequence 2 has letters \['U'\] outside the alphabet"):
        tasks_design.read_sequences(path, ALPHABET)


def test_design_sequences_demo_runs_and_guidance_helps(capsys):
    import runpy
    from pathlib import Path

    demo = runpy.run_path(str(Path(__file__).resolve().parents[1] / "demos" / "design_sequences.py"))
    assert demo["main"](["--train-steps", "150", "--num", "64"]) == 0
    printed = capsys.readouterr().out
    rates = {name: float(rate) for name, rate in re.findall(r"(unguided|guided):\s+([\d.]+)% carry", printed)}
    assert rates["guided"] > rates["unguided"] + 30, printed
