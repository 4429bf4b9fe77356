"""Random-weight pixel-space velocity networks for the generic adapter (``guidance/backbones/generic.py``): the
backbone of the pixel-space solvers (OT-ODE, ICTM, Flower, PnP-Flow, D-Flow as their papers run them).

``pnp_flow_unet`` is the network of PnP-Flow's and Flower's experiments (annegnx/PnP-Flow
ee5b159e6edff4d585ebf36c9a5333ffa85e066c, ``pnpflow/utils.py`` ``define_model`` for the "ot" model:
``pnpflow/models.py`` ``UNet(ch=32, ch_mult=(1, 2, 4, 8), num_res_blocks=6, attn_resolutions=(16, 8))``) rebuilt
as a diffusers ``UNet2DModel`` with the same widths, depth and attention placement at 128² (CelebA): four levels of
32, 64, 128 and 256 channels, six residual blocks each, self-attention at the 16² level. It is not the official
module (the official checkpoints do not load into it); its cost per evaluation is the same order, which is what
the speed table needs. ``tiny_pixel_unet`` is its miniature for CPU tests.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .common import building

__all__ = ["PNP_FLOW_UNET", "pnp_flow_unet", "pixel_flow_model", "tiny_pixel_unet"]

#: The official "ot" network's layout in diffusers' terms (see the module docstring).
PNP_FLOW_UNET = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64, 128, 256), layers_per_block=6,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
    attention_head_dim=32,
)


def pnp_flow_unet(sample_size: int = 128, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """The PnP-Flow / Flower "ot" network's architecture with random weights (seeded), in ``dtype`` on ``device``."""
    torch.manual_seed(0)
    with building(device, dtype):
        return UNet2DModel(sample_size=sample_size, **PNP_FLOW_UNET).eval()


def tiny_pixel_unet(sample_size: int = 32) -> UNet2DModel:
    """A two-level miniature of :func:`pnp_flow_unet` (float32, CPU, seeded)."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).eval()


def pixel_flow_model(network: UNet2DModel):
    """A pixel-space :class:`~guidance.backbones.generic.GenericFlowModel` around ``network`` (no autoencoder; the
    network receives t = 1000 s, as diffusers' UNets are trained)."""
    from guidance.backbones.generic import GenericFlowModel

    return GenericFlowModel(network, None, timestep_scale=1000.0)
