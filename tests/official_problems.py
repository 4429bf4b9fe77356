"""What the parity tests of the PnP-Flow codebase's solvers share (annegnx/PnP-Flow ee5b159 and its fork
mehrsapo/Flower 6b9eaca: PnP-Flow, OT-ODE, ICTM, D-Flow, Flower): the official problems on 4x4 images and seeded
generators. The tests pass ``pytest.mark.usefixtures("one_thread")`` (conftest) for their thousands of tiny ops."""

import torch

from operators import make_operator
from operators.function import FunctionOperator


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decimation():
    """The official SR operator (pnpflow/utils.py ``downsample`` / ``upsample``): keep the top-left pixel of each
    2x2 block; its adjoint puts the pixels back and zeros elsewhere."""
    def adjoint(y):
        x = y.new_zeros(*y.shape[:-2], 2 * y.shape[-2], 2 * y.shape[-1])
        x[..., ::2, ::2] = y
        return x
    return FunctionOperator(lambda x: x[..., ::2, ::2], linear=True, adjoint=adjoint)


#: the official problems on 4x4 images: the operator of each problem at this size (paintbrush inpainting is the
#: inpainting branch with another mask)
OPERATORS = {
    "denoising": lambda: make_operator("denoise"),
    "gaussian_deblurring_FFT": lambda: make_operator("gaussian_blur:kernel_size=3,sigma=1.0,padding=circular"),
    "superresolution": decimation,
    "inpainting": lambda: make_operator("inpaint_box:size=2"),
    "random_inpainting": lambda: make_operator("inpaint_random:fraction=0.7"),
}
