"""The default model's evaluation table: each method as it comes, made consistent, as a consistent mean; floors."""

import pytest
from tasks import evaluate_default
from tasks.evaluate_default import markdown, restoration_table, summarise

pytestmark = pytest.mark.usefixtures("offline_cache")


def test_restoration_table_rows_and_grid(monkeypatch):
    from guidance import load_model
    from guidance.models.train_default import held_out_images

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
