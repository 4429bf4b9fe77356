"""The default model's evaluation table: each method as it comes, made consistent, as a consistent mean; floors."""

import pytest
import torch
from tasks.default_model import evaluate as evaluate_default
from tasks.default_model.evaluate import markdown, merge_rows, restoration_table, row_method, summarise

pytestmark = pytest.mark.usefixtures("offline_cache")


def test_restoration_table_rows_and_grid(monkeypatch):
    from guidance import load_model
    from tasks.default_model.train import held_out_images

    monkeypatch.setattr(evaluate_default, "OPERATORS", {"SR x4": ("sr:factor=4,noise_std=0.01", "bicubic")})
    crop = held_out_images(64)[:1]
    rows, grid = restoration_table(load_model("default"), {"SR x4": crop}, methods=("pnp_flow",), num_steps=2,
                                   samples=2)
    names = [row["method"] for row in rows]
    assert names == ["pnp_flow", "pnp_flow + consistency", "pnp_flow, mean of 2 + consistency", "bicubic",
                     "bicubic + consistency"]
    by_name = {row["method"]: row for row in rows}
    # made consistent with y, the method gains what the measurement holds; the floor's back-projection too
    assert by_name["pnp_flow + consistency"]["psnr"] > by_name["pnp_flow"]["psnr"]
    assert by_name["bicubic + consistency"]["psnr"] >= by_name["bicubic"]["psnr"] - 0.05
    assert by_name["pnp_flow, mean of 2 + consistency"]["seconds"] == pytest.approx(
        2 * by_name["pnp_flow"]["seconds"])
    cells, captions = grid[0]
    assert captions == ["SR x4", "pnp_flow + cons.", "bicubic", "reference"] and len(cells) == 4
    table = summarise(rows)
    text = markdown({"num_images": 1, "autoencoder_psnr": 28.0, "autoencoder_psnr_each": [28.0],
                     "restoration": table, "restoration_images": {"SR x4": 1}})
    assert "| SR x4 (1 image) |" in text and "| SR x4 | bicubic + consistency |" in text


def test_grid_only_methods_join_the_grid_with_their_first_sample_but_add_no_rows(monkeypatch):
    from guidance import load_model
    from tasks.default_model.train import held_out_images

    monkeypatch.setattr(evaluate_default, "OPERATORS", {"SR x4": ("sr:factor=4,noise_std=0.01", "bicubic")})
    crops = held_out_images(64)[:2]
    model = load_model("default")
    common = dict(methods=("flowchef", "pnp_flow"), num_steps=2, samples=2)
    full_rows, full_grid = restoration_table(model, {"SR x4": crops}, **common)
    rows, grid = restoration_table(model, {"SR x4": crops}, grid_only=("flowchef",), **common)
    assert {row_method(row) for row in rows} == {"pnp_flow", "bicubic"}
    def scores(table):
        return [(r["image"], r["method"], r["psnr"], r["ssim"]) for r in table if row_method(r) == "pnp_flow"]

    assert len(scores(rows)) == 6 and scores(rows) == scores(full_rows)
    assert grid[0][1] == full_grid[0][1] == ["SR x4", "flowchef + cons.", "pnp_flow + cons.", "bicubic", "reference"]
    for cell, full_cell in zip(grid[0][0], full_grid[0][0]):
        torch.testing.assert_close(cell, full_cell)  # one sample of seed + 1 is the first of a batched run


def test_merged_rows_keep_other_methods_measure_floors_anew_and_follow_the_table_order():
    def row(method, image=0, operator="SR x4", psnr=1.0):
        return {"operator": operator, "image": image, "method": method, "psnr": psnr}

    previous = [row("flair"), row("flair + consistency"), row("pnp_flow", psnr=0.0), row("bicubic", psnr=0.0),
                row("dps, mean of 4 + consistency"), row("flair", image=1)]
    new = [row("pnp_flow", psnr=2.0), row("pnp_flow, mean of 4 + consistency"), row("bicubic", psnr=3.0),
           row("pnp_flow", image=1)]
    merged = merge_rows(new, previous, ("pnp_flow",))
    assert [(r["image"], r["method"], r["psnr"]) for r in merged] == [
        (0, "flair", 1.0), (0, "flair + consistency", 1.0), (0, "pnp_flow", 2.0),
        (0, "pnp_flow, mean of 4 + consistency", 1.0), (0, "dps, mean of 4 + consistency", 1.0),
        (0, "bicubic", 3.0), (1, "flair", 1.0), (1, "pnp_flow", 1.0)]
    assert row_method(row("mean-colour fill + consistency")) == "mean-colour fill"


def test_a_run_of_some_methods_keeps_the_other_rows_of_the_same_settings(monkeypatch, tmp_path, capsys):
    import json

    from tasks.default_model.train import held_out_images

    monkeypatch.setattr(evaluate_default, "OPERATORS", {"SR x4": ("sr:factor=4,noise_std=0.01", "bicubic")})
    monkeypatch.setattr(evaluate_default, "held_out_images", lambda: held_out_images(64)[:2])
    common = ["--out", str(tmp_path), "--images", "2", "--steps", "2", "--restore-samples", "1",
              "--skip", "guidance,samples"]
    evaluate_default.main([*common, "--methods", "flowchef,pnp_flow"])
    first = json.loads((tmp_path / "evaluation.json").read_text())["restoration_rows"]
    evaluate_default.main([*common, "--methods", "pnp_flow"])
    assert "kept the earlier rows of flowchef" in capsys.readouterr().out
    second = json.loads((tmp_path / "evaluation.json").read_text())["restoration_rows"]
    assert [r["method"] for r in second] == [r["method"] for r in first]
    assert [r["psnr"] for r in second] == pytest.approx([r["psnr"] for r in first])
    evaluate_default.main([*common, "--methods", "pnp_flow", "--steps", "3"])  # other settings: nothing is kept
    third = json.loads((tmp_path / "evaluation.json").read_text())["restoration_rows"]
    assert {row_method(r) for r in third} == {"pnp_flow", "bicubic"}
