"""The speed run's settings (``Settings``: device, dtype, decoder, compilation, tiling, batch, repeats, seed,
threads, isolation, method options), checked once; and ``CellSkipped``, what a cell, a size or a whole backbone
raises when it cannot be measured."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from operators.checks import MAX_BATCH, check_int

#: the largest image side timed (a FLUX.1 image of 4096² is 65536 tokens; larger is beyond any card)
MAX_SIDE = 4096
#: the most timed repeats of one cell
MAX_REPEATS = 100

__all__ = ["CellSkipped", "Settings"]


@dataclass(frozen=True)
class Settings:
    """How every cell runs (picklable: it travels to the worker processes)."""

    device: str
    dtype: str
    decoder: str = "tiny"
    compile: str = "off"
    vae_tiling: bool = False
    batch_size: int = 1
    repeats: int = 3
    seed: int = 0
    threads: int = 1
    isolate: bool = True
    compile_backend: str | None = None
    options: dict = field(default_factory=dict)
    memory: str | None = None

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


class CellSkipped(ValueError):
    """A cell (or every cell of its backbone or size) cannot run; ``scope`` says which: cell, size or backbone."""

    def __init__(self, message: str, scope: str = "cell"):
        super().__init__(message)
        self.scope = scope


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _settings(device, dtype, decoder, compile, vae_tiling, batch_size, repeats, seed, isolate=True,
              compile_backend=None, options=None, memory=None) -> Settings:
    from guidance.loading.devices import check_device

    device = str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if dtype is None:
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype takes float32, bfloat16 or float16, got {dtype!r}")
    if decoder not in ("tiny", "full"):
        raise ValueError(f"--decoder takes tiny or full, got {decoder!r}")
    if compile not in ("off", "regional", "full"):
        raise ValueError(f"--compile takes off, regional or full, got {compile!r}")
    (batch_size,) = _positive_ints([batch_size], "--batch-size", MAX_BATCH)
    (repeats,) = _positive_ints([repeats], "--repeats", MAX_REPEATS)
    if compile_backend is not None and not (isinstance(compile_backend, str) and compile_backend.strip()):
        raise ValueError(f"--compile-backend takes a torch.compile backend name (e.g. inductor, eager), "
                         f"got {compile_backend!r}")
    options = {str(row): dict(values) for row, values in (options or {}).items()}
    if memory is not None:
        from guidance.memory_profiles import check_profile

        memory = check_profile(memory, allow_auto=False)
    return Settings(device, dtype, decoder, compile, bool(vae_tiling), batch_size, repeats, int(seed),
                    torch.get_num_threads(), bool(isolate), compile_backend, options, memory)


def _positive_ints(values, option: str, maximum: int) -> list[int]:
    """The distinct integers of ``values``, each in 1 .. ``maximum``; none at all is refused (an empty table)."""
    if not values:
        raise ValueError(f"{option} needs at least one value, e.g. {option} {min(512, maximum)}; got none")
    out = []
    for value in values:
        value = check_int(value, option, 1, maximum)
        if value not in out:
            out.append(value)
    return out
