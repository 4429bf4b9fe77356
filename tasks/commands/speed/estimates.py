"""How long a speed cell is expected to take before it runs, so that a time budget starts only the cells (and the
GPU kit only the runs) that fit in what is left.

The full-size backbones are estimated for one H100 in bf16 from their architecture: a network call costs its
FLOPs, ``batch · (2 · parameters · tokens + 4 · attention layers · width · tokens²)`` with ``tokens`` the image's
patches plus the text tokens, at :data:`GPU_FLOPS`, plus a kernel-launch overhead per block. A row's method costs
network calls and tiny-decoder passes (forward and backward) per step (:data:`METHOD_COSTS`); building a backbone,
compiling it and decoding (or encoding) with a full VAE cost fixed seconds. The miniatures, the default model and
the pixel networks get fixed seconds per call instead (the miniatures' on one CPU thread). A cell is its
warm-up of ``WARMUP_STEPS`` steps plus ``repeats`` timed runs, each with its final decode.

These are priors: :class:`Estimator` rescales them by what the cells measured so far took (the ratio of measured
to estimated seconds over the backbones opened and the cells measured in the run), so that a budget follows the
machine it runs on after the first cell."""

from __future__ import annotations

from dataclasses import dataclass

from .cells import EDITS, METHODS, WARMUP_STEPS, Cell

__all__ = ["BACKBONE_COSTS", "GPU_FLOPS", "METHOD_COSTS", "BackboneCost", "Estimator"]

#: bf16 FLOP/s that a diffusers transformer sustains on an H100 SXM (about 40 % of its dense peak of 989 TFLOP/s)
GPU_FLOPS = 4.0e14
#: seconds of kernel launches and Python per transformer block and network call on a GPU
LAUNCH_SECONDS_PER_BLOCK = 1.5e-4
#: seconds a fresh worker process takes to start and import torch and diffusers (CPU cells with ``isolate``)
SPAWN_SECONDS = 8.0


@dataclass(frozen=True)
class BackboneCost:
    """What one backbone costs. Transformers on a GPU: ``parameters``, ``attention`` (attention layers times
    their width), ``blocks`` (for the launch overhead), ``text_tokens`` and the call's ``batch`` (2: CFG as one
    batched call); others: ``call_seconds`` per network call at ``reference_size`` pixels, scaled by the pixel
    count above it. ``decoder_seconds``: one tiny-decoder forward and backward pass, ``vae_seconds`` one full-VAE
    decode or encode, both at ``reference_size``; ``open_seconds``: building the backbone and encoding its
    prompt; ``compile_seconds``: compiling its blocks with inductor (the first run at each size);
    ``cell_seconds``: what a cell costs besides its runs (its inputs, collecting memory, writing the results)."""

    open_seconds: float
    decoder_seconds: float
    vae_seconds: float
    reference_size: int = 1024
    parameters: float = 0.0
    attention: float = 0.0
    blocks: int = 0
    text_tokens: int = 0
    batch: int = 1
    call_seconds: float = 0.0
    compile_seconds: float = 30.0
    cell_seconds: float = 0.3
    full_vae: bool = False  # the final image is decoded by the full VAE (no tiny decoder is swapped in)

    def call(self, size: int) -> float:
        """Seconds of one network call on a ``size`` x ``size`` image."""
        if self.call_seconds:
            return self.call_seconds * max(1.0, (size / self.reference_size) ** 2)
        tokens = (size / 16) ** 2 + self.text_tokens  # 8x latents in 2x2 patches: one token per 16 x 16 pixels
        flops = self.batch * (2 * self.parameters * tokens + 4 * self.attention * tokens ** 2)
        return flops / GPU_FLOPS + self.blocks * LAUNCH_SECONDS_PER_BLOCK

    def pixels(self, seconds: float, size: int) -> float:
        """``seconds`` at ``reference_size`` scaled to a ``size`` x ``size`` image (at least a tenth of it)."""
        return seconds * max(0.1, (size / self.reference_size) ** 2)


#: The backbones of ``BACKBONES``. Full size: the released architectures (tasks.random_models), on an H100;
#: text tokens are the CLIP and T5 sequences each pipeline pads to (Qwen-Image: the prompt's own tokens).
BACKBONE_COSTS = {
    "sd3.5-medium": BackboneCost(open_seconds=8.0, decoder_seconds=0.01, vae_seconds=0.15, parameters=2.24e9,
                                 attention=(24 + 13) * 1536, blocks=24, text_tokens=77 + 256, batch=2,
                                 compile_seconds=40.0),
    "flux-dev": BackboneCost(open_seconds=15.0, decoder_seconds=0.01, vae_seconds=0.15, parameters=11.9e9,
                             attention=(19 + 38) * 3072, blocks=19 + 38, text_tokens=512, compile_seconds=60.0),
    "flux2-klein-4b": BackboneCost(open_seconds=8.0, decoder_seconds=0.01, vae_seconds=0.2, parameters=3.88e9,
                                   attention=(5 + 20) * 3072, blocks=5 + 20, text_tokens=512, compile_seconds=50.0,
                                   full_vae=True),
    "flux2-klein-9b": BackboneCost(open_seconds=15.0, decoder_seconds=0.01, vae_seconds=0.2, parameters=9.08e9,
                                   attention=(8 + 24) * 4096, blocks=8 + 24, text_tokens=512, compile_seconds=50.0,
                                   full_vae=True),
    "qwen-image": BackboneCost(open_seconds=25.0, decoder_seconds=0.01, vae_seconds=0.4, parameters=20.4e9,
                               attention=60 * 3072, blocks=60, text_tokens=32, batch=2, compile_seconds=40.0,
                               full_vae=True),
    "pnp-flow-unet": BackboneCost(open_seconds=3.0, decoder_seconds=0.0, vae_seconds=0.0, reference_size=256,
                                  call_seconds=0.006, compile_seconds=30.0),
    # on one CPU thread, at the sizes their tests and the kit's dry run use
    "tiny-sd3": BackboneCost(open_seconds=1.0, decoder_seconds=0.002, vae_seconds=0.005, reference_size=32,
                             call_seconds=0.02, compile_seconds=3.0, cell_seconds=0.15),
    "tiny-flux": BackboneCost(open_seconds=1.0, decoder_seconds=0.002, vae_seconds=0.005, reference_size=32,
                              call_seconds=0.02, compile_seconds=3.0, cell_seconds=0.15),
    "tiny-flux2-klein": BackboneCost(open_seconds=1.0, decoder_seconds=0.002, vae_seconds=0.005, reference_size=32,
                                     call_seconds=0.02, compile_seconds=3.0, cell_seconds=0.15, full_vae=True),
    "tiny-qwen-image": BackboneCost(open_seconds=1.0, decoder_seconds=0.002, vae_seconds=0.005, reference_size=32,
                                    call_seconds=0.02, compile_seconds=3.0, cell_seconds=0.15, full_vae=True),
    "tiny-pixel": BackboneCost(open_seconds=0.5, decoder_seconds=0.0, vae_seconds=0.0, reference_size=32,
                               call_seconds=0.02, compile_seconds=3.0, cell_seconds=0.15),
    "default": BackboneCost(open_seconds=2.0, decoder_seconds=0.01, vae_seconds=0.02, reference_size=128,
                            call_seconds=0.025, compile_seconds=10.0, cell_seconds=0.3),
}

#: row -> (network calls per step in forward-pass equivalents (a backward pass counts two), tiny-decoder forward
#: and backward passes per step). The editors' calls are each editor's own loop; FlowEdit edits 33/50 of the steps
#: with CFG, 24/28 of them on a guidance-distilled model (:data:`CFG_BACKBONES`). FLAIR's decoder passes are its
#: data steps (option ``data_steps``, default 15).
METHOD_COSTS = {
    "unguided": (1.0, 0.0),
    "flowchef-latent": (1.0, 0.0),
    "flowchef-pixel": (1.0, 1.0),
    "flair": (1.0, 15.0),
    "pnp_flow": (2.0, 1.0),
    "dps": (3.0, 1.0),
    "flowdps": (1.0, 3.0),
    "psld": (3.0, 2.0),
    "d_flow": (60.0, 20.0),
    "ot_ode": (3.0, 1.0),
    "ictm": (8.0, 2.0),
    "flower": (1.5, 1.0),
    "flowedit": (2.0, 0.0),
    "rf_inversion": (2.0, 0.0),
    "rf_solver_edit": (4.0, 0.0),
}
#: Python and solver work per sampling step besides the network (seconds)
STEP_SECONDS = 0.002
#: the backbones that sample with CFG (FlowEdit edits 33/50 of their steps, 24/28 elsewhere)
CFG_BACKBONES = ("sd3.5-medium", "qwen-image", "tiny-sd3", "tiny-qwen-image")


def _flowedit_share(backbone: str) -> float:
    return 33 / 50 if backbone in CFG_BACKBONES else 24 / 28


@dataclass
class Estimator:
    """Estimated seconds of opening a backbone and of each cell, for one run's settings, rescaled by
    :meth:`record` with what was measured (``scale``: measured over estimated seconds so far, 1 before)."""

    repeats: int = 1
    batch_size: int = 1
    decoder: str = "tiny"
    compile: str = "off"
    compile_backend: str | None = None
    options: dict | None = None
    spawn: bool = False  # every cell in a fresh process (CPU cells with ``isolate``)
    measured: float = 0.0
    estimated: float = 0.0

    @property
    def scale(self) -> float:
        return self.measured / self.estimated if self.estimated > 0 and self.measured > 0 else 1.0

    def record(self, estimated: float, measured: float) -> None:
        """Add one opened backbone or measured cell: its prior estimate and the seconds it took."""
        self.estimated += estimated
        self.measured += measured

    def _compile(self, cost: BackboneCost) -> float:
        if self.compile == "off":
            return 0.0
        return cost.compile_seconds * (1.0 if self.compile_backend in (None, "inductor") else 0.2)

    def open_seconds(self, backbone: str) -> float:
        """Prior seconds of building ``backbone`` and compiling it for its first size."""
        cost = BACKBONE_COSTS[backbone]
        return cost.open_seconds + self._compile(cost)

    def cell_seconds(self, cell: Cell, recompile: bool = False) -> float:
        """Prior seconds of one cell: warm-up and timed runs, with their final decodes (and for an editor its
        source encodes); ``recompile``: the first cell at a new size of a compiled backbone compiles again."""
        cost = BACKBONE_COSTS[cell.backbone]
        calls, passes = METHOD_COSTS[cell.method]
        if cell.method == "flair":
            passes = float((self.options or {}).get("flair", {}).get("data_steps", passes))
        if cell.method == "flowedit":
            calls *= _flowedit_share(cell.backbone)
        full = self.decoder == "full"
        step = (calls * cost.call(cell.size)
                + passes * cost.pixels(cost.vae_seconds if full else cost.decoder_seconds, cell.size) + STEP_SECONDS)
        final = cost.pixels(cost.vae_seconds if full or cost.full_vae else cost.decoder_seconds, cell.size)
        if METHODS[cell.method][1] in EDITS:
            final += cost.pixels(cost.vae_seconds, cell.size)  # the source image, encoded by the full VAE
        steps = min(cell.steps, WARMUP_STEPS) + self.repeats * cell.steps
        seconds = self.batch_size * (steps * step + (1 + self.repeats) * final) + cost.cell_seconds
        if self.spawn:  # a fresh process opens (and compiles) the backbone for this cell alone
            return seconds + SPAWN_SECONDS + self.open_seconds(cell.backbone)
        return seconds + (self._compile(cost) if recompile else 0.0)

    def run_seconds(self, backbones, methods, sizes, steps) -> float:
        """Prior seconds of a whole run in ``run_speed``'s order: each backbone opened (in this process unless
        every cell spawns its own), then its cells, size by size."""
        total = 0.0
        for backbone in backbones:
            total += 0.0 if self.spawn else self.open_seconds(backbone)
            for index, size in enumerate(sizes):
                for position, cell in enumerate(Cell(backbone, m, size, n) for n in steps for m in methods):
                    total += self.cell_seconds(cell, recompile=index > 0 and position == 0)
        return total
