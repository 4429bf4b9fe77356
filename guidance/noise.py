"""Drawing noise: the standard normal draws of the samplers and SDEs, from explicit torch generators.

Below both :mod:`guidance.sampler` (the initial noise) and :mod:`guidance.sde` (fresh noise at every step), so
neither imports the other for it.
"""

from __future__ import annotations

import torch

from operators.checks import check_generator  # the one rule for generators, re-exported here

__all__ = ["check_generator", "initial_noise"]


def initial_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn like diffusers' ``randn_tensor``; returned as float32.

    The draw happens on the generator's device (a CPU generator gives the same numbers whatever ``device`` is)
    and in ``dtype`` (the backbone's dtype, as the pipelines draw their latents), so one seed gives the same
    starting point as the diffusers pipeline. A list of generators seeds each batch element separately.
    """
    device = torch.device(device)
    check_generator(generator)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        parts = [
            torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generator
        ]
        noise = torch.cat(parts)
    else:
        draw_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
    return noise.float()
