"""FlowChef's loop reads nothing back from the device: no .item(), bool(tensor), float(tensor) or copy to the host
between its first and last step (the divergence check is deferred to one read after the loop)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from guidance.methods import get_method
from guidance.methods.common import DivergenceError
from guidance.objectives import ClassifierObjective, MeasurementFidelity
from operators import make_operator

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

