"""Bounded work and no silent no-ops: every count has a bound and every option a rule, checked where it enters,
the same for the command line and the API, refused in one line (the value, the problem, the fix) with nothing
written."""

import math

import pytest
import torch

from guidance import MeasurementFidelity, get_method, load_model, sample
from operators import make_operator
from operators.checks import MAX_ITERATIONS, MAX_STEPS, check_int, check_work
from tasks.outputs.image_io import save_image


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


@pytest.fixture()
def photo(tmp_path):
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    return save_image(torch.stack([x, y, x * y])[None] * 0.8, tmp_path / "photo.png")


def refused(cli, out, *args) -> str:
    """Run the command, assert exit 2 with one line on stderr and nothing left in ``out``; return that line."""
    code, _, stderr = cli(*args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flowsteer: error: "), stderr
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return lines[0]


RESTORE = ("restore", "{photo}", "--simulate", "--operator", "sr:factor=2", "--steps", "2", "--quiet")


@pytest.mark.parametrize("extra, expected", [
    (("--steps", "1000000000"), "the number of steps (--steps)=1000000000 is more than one run takes (at most "
                                "10000); use the number of steps (--steps) <= 10000"),
    (("--consistency-steps", "1000000000"), "the consistency steps=1000000000 is more than one run takes"),
    (("--method", "flowchef", "--option", "inner_steps=1000000000"), "inner_steps=1000000000 is more than one run "
                                                                     "takes (at most 10000); use inner_steps <= 10000"),
    (("--method", "flowchef", "--option", "inner_steps=1e9"), "inner_steps must be an integer >= 0, got 1000000000.0 "
                                                              "(write it as the integer 1000000000)"),
    (("--method", "flair", "--option", "data_steps=1000000000"), "data_steps=1000000000 is more than one run takes"),
    (("--method", "flair", "--option", "data_steps=5000", "--steps", "5000"),
     "flair would run num_steps=5000 x data_steps=5000 = 25,000,000 iterations, more than one call takes "
     "(10,000,000); lower one of them"),
    (("--method", "flowchef", "--option", "inner_steps=0"), "inner_steps must be an integer >= 1, got 0; "
                                                            "inner_steps=0 guides no step"),
    (("--method", "flowchef", "--option", "stop_sigma=2"), "stop_sigma=2 is at or above the noise level of every "
                                                           "guided step"),
    (("--method", "flair", "--option", "check_divergence=maybe"), "check_divergence must be True or False, got "
                                                                  "'maybe' (str)"),
    (("--seed", str(2**70)), f"the seed (--seed)={2**70} is outside the seeds a torch.Generator takes; seeds are "
                             f"integers in 0 .. {2**63 - 1}"),
    (("--samples", "100000"), "samples=100000 is more than one run takes (at most 4096)"),
])
def test_restore_refuses_unbounded_work_and_options_that_do_nothing(cli, photo, tmp_path, extra, expected):
    out = tmp_path / "r"
    args = [a.format(photo=photo) for a in RESTORE] + list(extra) + ["--out", out]
    assert expected in refused(cli, out, *args)


def test_a_flag_option_takes_true_and_false_in_any_case(cli, photo, tmp_path):
    code, _, stderr = cli(*[a.format(photo=photo) for a in RESTORE], "--method", "flair", "--option",
                          "check_divergence=false", "--option", "data_steps=1", "--out", tmp_path / "r")
    assert code == 0, stderr


@pytest.mark.parametrize("extra, expected", [
    (("--num", "1000000000"), "the number of images (--num)=1000000000 is more than one run takes (at most 4096)"),
    (("--size", "0", "0"), "the image height (--size, --height) must be an integer >= 1, got 0"),
    (("--size", "0"), "the image height (--size, --height) must be an integer >= 1, got 0"),
    (("--size", "32", "32", "32"), "--size takes one number (a square: --size 512) or two (height and width"),
    (("--size", "100000", "100000"), "a 100000x100000 generation needs about"),
    (("--steps", "1000000000"), "the number of steps (--steps)=1000000000 is more than one run takes"),
    (("--num", "4000", "--steps", "5000"), "generate would run num=4000 x num_steps=5000 = 20,000,000 iterations"),
])
def test_generate_refuses_unbounded_work_and_sizes_it_would_replace(cli, tmp_path, extra, expected):
    out = tmp_path / "g"
    line = refused(cli, out, "generate", "--classifier", "default", "--label", "0", "--steps", "2", "--quiet",
                   "--out", out, *extra)
    assert expected in line
    if "needs about" in line:  # names a size that fits
        assert "more than the" in line and "GiB free here; use at most" in line


def test_calibrate_and_speed_refuse_unbounded_and_empty_requests(cli, tmp_path, photo):
    out = tmp_path / "s"
    assert "the calibration points (--points)=1000000000 is more than one run takes" in refused(
        cli, out, "calibrate", "--images", photo.parent, "--points", "1000000000", "--cache-dir", out, "--quiet")
    assert "--sizes=100000 is more than one run takes (at most 4096)" in refused(
        cli, out, "speed", "--backbones", "default", "--sizes", "100000", "--out", out)
    assert "--sizes needs at least one value, e.g. --sizes 512; got none" in refused(
        cli, out, "speed", "--backbones", "default", "--sizes", "", "--out", out)


def test_sample_refuses_an_empty_batch_non_finite_latents_and_a_huge_size(default_model):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        sample(default_model, num_steps=2, height=32, width=32, batch_size=0, generator=g, progress=False)
    latents = torch.full((1, *default_model.latent_shape(32, 32)), float("nan"))
    with pytest.raises(ValueError, match="latents contain .* NaN or infinite value"):
        sample(default_model, num_steps=2, latents=latents, progress=False)
    with pytest.raises(ValueError, match=r"a 65536x65536 sampling run needs about .* GiB .* use at most \d+x\d+"):
        sample(default_model, num_steps=2, height=65536, width=65536, generator=g, progress=False)
    with pytest.raises(ValueError, match=r"got 3 generators for a batch of 2"):
        sample(default_model, num_steps=2, height=32, width=32, batch_size=2, progress=False,
               generator=[torch.Generator().manual_seed(i) for i in range(3)])


def test_a_method_refuses_the_same_bounds_and_flags_through_the_api(default_model):
    op = make_operator("sr:factor=2")
    y = op(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_steps=1000000000 is more than one run takes"):
        get_method("flowchef")(default_model, MeasurementFidelity(op, y), num_steps=10**9, progress=False)
    with pytest.raises(ValueError, match="check_divergence must be True or False, got 'maybe'"):
        get_method("dps", check_divergence="maybe")
    with pytest.raises(ValueError, match="step_size must be a finite number, got inf"):
        get_method("flowchef", step_size=math.inf)


def test_the_measurement_fidelity_and_restore_refuse_what_they_would_ignore_or_misread(default_model):
    from tasks import restore

    op = make_operator("sr:factor=2")
    y = op(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="noise_std must be a number >= 0, got -1"):
        MeasurementFidelity(op, y, noise_std=-1)
    with pytest.raises(ValueError, match="num_steps=2 and num_inference_steps=3 are the same setting"):
        restore(default_model, torch.zeros(1, 3, 32, 32), "sr:factor=2", "pnp_flow", simulate=True, num_steps=2,
                num_inference_steps=3, progress=False)
    for seed, words in ((2**70, "is outside the seeds a torch.Generator takes"),
                        (1.5, "must be an integer >= 0, got 1.5")):
        with pytest.raises(ValueError, match=f"seed.*{words}"):
            restore(default_model, torch.zeros(1, 3, 32, 32), "sr:factor=2", "pnp_flow", simulate=True, seed=seed,
                    num_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"the measurement y has values in \[200, 200\], but images and their "
                                         r"measurements are in \[-1, 1\]; map a 0-255 image with x / 127.5 - 1"):
        restore(default_model, torch.full((1, 3, 16, 16), 200.0), "sr:factor=2", "pnp_flow", num_steps=2,
                progress=False)


def test_the_shared_rules_name_the_value_and_bound_the_work():
    assert check_int(7, "n") == 7 and MAX_STEPS == MAX_ITERATIONS == 10_000
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ValueError, match="n must be an integer >= 0"):
            check_int(bad, "n")
    assert check_work({"num_steps": 28, "inner_steps": 5}) == 140
    with pytest.raises(ValueError, match="x would run a=10000 x b=10000 = 100,000,000 iterations"):
        check_work({"a": 10_000, "b": 10_000}, "x")
