"""Host reads inside the methods' loops: .item(), bool(tensor), float(tensor), int(tensor) and copies to the host
between the first and the last step. FlowChef's loop reads nothing back (the divergence check is deferred to one
read after the loop); every registered method's count per step is fixed in :data:`EXPECTED_HOST_READS`, with the
reason for each read that stays."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guidance.analytic.categorical import AnalyticSimplexFlow, CategoricalMixture
from guidance.methods import REGISTRY, get_method
from guidance.methods.common import DivergenceError
from guidance.objectives import ClassifierObjective, MeasurementFidelity
from operators import make_operator
from tasks.random_models.generic import pixel_flow_model, tiny_pixel_unet

HOST_READS = {torch.ops.aten._local_scalar_dense.default}  # what .item(), bool(t), float(t), int(t) dispatch to


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads; ``marks`` snapshots the count at each step callback."""

    def __init__(self):
        super().__init__()
        self.count, self.marks = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        elif func is torch.ops.aten._to_copy.default and kwargs and kwargs.get("device") == torch.device("cpu"):
            source = args[0]
            if isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective_kind", ["measurement", "classifier"])
def test_flowchef_loop_has_no_host_reads(sd3, objective_kind):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if objective_kind == "measurement":
        operator = make_operator("sr:factor=2")
        objective = MeasurementFidelity(operator, operator(x))
    else:
        weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
        objective = ClassifierObjective(lambda image: image.mean((-2, -1)) @ weight.T, 2, num_classes=5)
    mode = HostReads()

    def callback(info):
        mode.marks.append(mode.count)

    with mode:
        out = get_method("flowchef", step_size=0.5)(sd3, objective, num_steps=4, height=32, width=32,
                                                    generator=torch.Generator().manual_seed(2), callback=callback,
                                                    progress=False)
    assert len(mode.marks) == 4 and torch.isfinite(out.image).all()
    assert mode.marks[-1] == mode.marks[0], f"{mode.marks[-1] - mode.marks[0]} host reads inside the loop"


def test_the_deferred_divergence_check_still_names_the_step(sd3):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    operator = make_operator("sr:factor=2")
    objective = MeasurementFidelity(operator, operator(x))
    with pytest.raises(DivergenceError, match="flowchef diverged: .* at step 0; use a smaller step_size than 1e"):
        get_method("flowchef", step_size=1e30)(sd3, objective, num_steps=3, height=32, width=32,
                                               generator=torch.Generator().manual_seed(2), progress=False)



@pytest.mark.parametrize("family", ["lumina2", "z_image", "qwen_image", "chroma", "sana", "flux2-klein"])
def test_a_cfg_step_of_every_family_reads_nothing_back(family):
    """Unguided sampling with CFG reads nothing between its steps on any family (the tiny SD3 and FLUX.1 in the
    table below). Checked to fail: with Lumina 2's and Z-Image's test of the guided samples read at every step
    (also without CFG truncation), and Qwen-Image's test of its text mask, each reads 1 per step."""
    from guidance import load_model, sample
    from tasks.random_models import tiny_pipeline

    model = load_model(tiny_pipeline(family))
    cond = model.condition("a photo of a cat", "blurry", true_cfg_scale=3.0) if family == "qwen_image" else \
        model.condition("a photo of a cat", "blurry", 4.0)
    mode = HostReads()
    with mode:
        sample(model, cond, num_steps=3, height=32, width=32, generator=_gen(0), progress=False, decode=False,
               callback=lambda info: mode.marks.append(mode.count))
    assert len(mode.marks) == 3 and mode.marks[-1] == mode.marks[0], f"{family}: {mode.marks}"


# -- every method's reads per step ---------------------------------------------------------------------------------

#: Host reads per step of every registered method, in the runs of :func:`_case` (None: the count varies from step
#: to step), and why each read that stays is there. On this CPU machine a read of a CPU tensor counts too; the
#: reasons say which reads stay on the host on a GPU (no synchronisation there).
EXPECTED_HOST_READS = {
    "unguided": (0, ""),
    "pseudo_inverse": (0, "no loop: A⁺y and one encode"),
    "flowchef": (0, ""),
    "flowchef_edit": (0, ""),
    "flair": (4, "one per data step (2 here: its discrepancy rule decides whether to go on), one divergence check "
                 "per step (the data steps synchronise anyway), and float(grid[i]) of its schedule, a CPU tensor "
                 "(no synchronisation on a GPU)"),
    "dps": (0, ""),
    "pnp_flow": (0, ""),
    "straight_through": (2, "torch.multinomial checks its probabilities on the host, and draws where the generator "
                            "lives (a CPU generator: a copy to the host on a GPU)"),
    "best_of_n": (0, ""),
    "particles": (5, "at each resampling step (the last step does not resample): the rewards' finiteness check, the "
                     "weights' check in ancestors(), the resampling decision, the mean reward for info and the SDE's "
                     "test for a final step (guidance/sde.py); on a GPU also the decision's copy to the host and "
                     "torch.unique for the count of distinct ancestors"),
    "flowdps": (0, ""),
    "psld": (0, ""),
    "ot_ode": (3, "one per conjugate-gradient iteration (3 here): its early-exit test on the residual "
                  "(operators/conjugate_gradient.py)"),
    "d_flow": (None, "L-BFGS reads its loss and gradient on the host in every line-search evaluation (torch.optim), "
                     "a number that varies per outer step"),
    "ictm": (1, "Adam's step counter (torch.optim), a CPU tensor also on a GPU (no synchronisation there)"),
    "flower": (3, "one per conjugate-gradient iteration (3 here): its early-exit test on the residual "
                  "(operators/conjugate_gradient.py)"),
    "flowedit": (0, ""),
    "inversion_edit": (0, ""),
    "rf_inversion": (0, ""),
    "rf_solver_edit": (0, ""),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _SequenceClassifier(torch.nn.Module):
    """A linear two-class classifier on (B, L, K) one-hot rows."""

    def __init__(self, length: int, vocab_size: int):
        super().__init__()
        self.weights = torch.randn(length, vocab_size, generator=_gen(5))
        self.vocab_size = vocab_size

    def forward(self, h):
        score = (h * self.weights).sum((-1, -2))
        return torch.stack([-score / 2, score / 2], dim=1)


@pytest.fixture(scope="module")
def pixel_model():
    """A pixel-space network without host reads of its own (the analytic priors read their noise level)."""
    return pixel_flow_model(tiny_pixel_unet(8))


def _case(name: str, sd3, pixel_model) -> tuple:
    """(model, objective, method options, run arguments) of a small run of method ``name``: a latent model (the
    tiny SD3) for the latent and editing methods, a pixel network for the pixel-space solvers, a simplex flow for
    straight-through guidance."""
    image = torch.rand(1, 3, 16, 16, generator=_gen(0)) * 2 - 1
    operator = make_operator("sr:factor=2")
    fidelity = MeasurementFidelity(operator, operator(image))
    weight = torch.randn(5, 3, generator=_gen(1))
    classifier = ClassifierObjective(lambda x: x.mean((-2, -1)) @ weight.T, 2, num_classes=5)
    size = {"height": 16, "width": 16, "generator": _gen(3)}
    edit = {"source_image": image, "source_prompt": "a photo of a cat", "edit_prompt": "a photo of a dog"}
    if name in ("ot_ode", "ictm", "flower"):
        clean = torch.rand(1, 3, 8, 8, generator=_gen(1)) * 2 - 1
        noisy = make_operator("sr:factor=2", noise_std=0.05)
        options = {"cg_iterations": 3} if name in ("ot_ode", "flower") else {}
        return (pixel_model, MeasurementFidelity(noisy, noisy.measure(clean, _gen(2))), options,
                {"height": 8, "width": 8, "generator": _gen(3), "num_steps": 3 if name == "ictm" else 4})
    if name == "straight_through":
        flow = AnalyticSimplexFlow(CategoricalMixture.random(3, 6, 4, generator=_gen(0)))
        objective = ClassifierObjective(_SequenceClassifier(6, 4), 1, space="latent", num_classes=2)
        return flow, objective, {"samples": 2}, {"generator": _gen(3)}
    cases = {
        "unguided": (None, {}, size),
        "pseudo_inverse": (fidelity, {}, size),
        "flowchef": (fidelity, {}, size),
        "flowchef_edit": (None, {**edit, "mask": torch.ones(16, 16), "step_size": 0.01, "inner_steps": 1,
                                 "source_steps": 2}, {}),
        "flair": (fidelity, {"data_steps": 2}, size),
        "dps": (fidelity, {}, size),
        "pnp_flow": (fidelity, {}, size),
        "best_of_n": (classifier, {"candidates": 2}, size),
        "particles": (classifier, {"particles": 2}, size),
        "flowdps": (fidelity, {"data_steps": 1}, size),
        "psld": (fidelity, {}, size),
        "d_flow": (fidelity, {"max_iter": 3, "lbfgs_iter": 1, "alpha": 0.0}, {**size, "num_steps": 2}),
        "flowedit": (None, {**edit, "n_max": 4}, {}),
        "inversion_edit": (classifier, {**edit, "strength": 1.0}, {}),
        "rf_inversion": (None, edit, {}),
        "rf_solver_edit": (None, edit, {}),
    }
    objective, options, arguments = cases[name]
    return sd3, objective, options, arguments


def test_the_table_covers_every_method():
    assert set(EXPECTED_HOST_READS) == set(REGISTRY)


@pytest.mark.filterwarnings("ignore:no calibrated regularization weights")
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_host_reads_per_step_of_every_method(sd3, pixel_model, name):
    """Counted between consecutive step callbacks (the end of one step and the start of the next): every interval
    but the last holds :data:`EXPECTED_HOST_READS`' count, the last at most that (particles' last step does not
    resample). What is counted: ``aten._local_scalar_dense`` (``.item()``, ``bool``, ``float``, ``int`` of any tensor,
    CPU ones included) and copies from another device to the CPU (none here: everything runs on the CPU). Checked
    to fail: with DPS's residual and divergence checks back inside its loop (``bool(...)`` after every step) the
    count is 3 per step, with PnP-Flow's ``float(sigma)`` 1; with SR's pseudo-inverse by conjugate gradients
    (before its closed form) FlowDPS and PSLD read 13 per step."""
    expected, reason = EXPECTED_HOST_READS[name]
    model, objective, options, arguments = _case(name, sd3, pixel_model)
    mode = HostReads()
    with mode:
        get_method(name, **options)(model, objective, **{"num_steps": 4, **arguments}, progress=False,
                                    callback=lambda info: mode.marks.append(mode.count))
    intervals = [after - before for before, after in zip(mode.marks, mode.marks[1:])]
    if name == "pseudo_inverse":
        assert mode.marks == [], "pseudo_inverse takes no step"
        return
    assert len(intervals) >= 2, f"{name} called its step callback {len(mode.marks)} times"
    if expected is None:
        assert all(count > 0 for count in intervals), f"{name}: {intervals} ({reason})"
    else:
        assert intervals[:-1] == [expected] * (len(intervals) - 1) and intervals[-1] <= expected, \
            f"{name} reads {intervals} between its steps, expected {expected} ({reason or 'none'})"
