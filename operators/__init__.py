"""Forward models y = A(x) + n for image restoration: blur, motion blur, inpainting, super-resolution,
denoising, colorization, JPEG, compositions and user functions."""

from .base import LinearOperator, Operator, check_finite, check_image
from .colorization import Colorization
from .composition import Composition
from .convolution import Convolution
from .deepinv_bridge import DeepinvOperator, from_deepinv, to_deepinv  # deepinv itself is imported on first use
from .denoising import Denoising
from .function import FunctionOperator
from .gaussian_blur import GaussianBlur
from .inpainting import BoxInpainting, FileMaskInpainting, FreeformInpainting, Inpainting, RandomInpainting
from .jpeg import JPEGCompression
from .masks import box_mask, freeform_mask, mask_from_file, random_mask
from .motion_blur import LineMotionBlur, MotionBlur, random_trajectory_kernel
from .registry import (OperatorEntry, as_operator, get_entry, list_operators, make_operator, operator_name,
                       operator_spec, parse_spec)
from .super_resolution import AveragePoolDownsampling, BicubicDownsampling

__all__ = [
    "AveragePoolDownsampling", "BicubicDownsampling", "BoxInpainting", "Colorization", "Composition",
    "Convolution", "Denoising", "FileMaskInpainting", "FreeformInpainting", "FunctionOperator", "GaussianBlur",
    "Inpainting", "JPEGCompression", "LineMotionBlur", "LinearOperator", "MotionBlur", "Operator",
    "OperatorEntry", "RandomInpainting", "as_operator", "box_mask", "check_finite", "check_image", "freeform_mask",
    "get_entry", "list_operators", "make_operator", "mask_from_file", "operator_name", "operator_spec", "parse_spec",
    "random_mask", "random_trajectory_kernel", "DeepinvOperator", "from_deepinv", "to_deepinv",
]
