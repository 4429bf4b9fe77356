"""``flowsteer speed`` and :func:`run_speed` (``tasks.speed``): wall time per image, peak memory and NFE of every
guidance method beside unguided sampling, per backbone x size x steps. One concern per file:

* ``run.py``: :func:`run_speed`, step by step: the settings and cells checked, each backbone's cells measured (in
  this process, or one fresh process per cell on the CPU) within the time budget, the results rewritten after
  every row; :func:`estimate_speed`, a run's estimated seconds;
* ``settings.py``: the run's settings, and ``CellSkipped``;
* ``backbones.py``: the backbones (``BACKBONES``), opened with the run's decoder, compilation and tiling;
* ``cells.py``: the rows (``METHODS``), what each row's method is given, and one cell's measurement;
* ``estimates.py``: each cell's estimated seconds before it runs (``Estimator``), what a time budget starts by;
* ``report.py``: ratios to unguided, the scaling with the steps, the targets, table.md and results.json;
* ``arguments.py``: the command line.
"""

from .arguments import add_parser
from .backbones import BACKBONES, FULL_SIZE, open_backbone
from .cells import EDIT_PROMPTS, METHODS, Cell, cell_options, measure_cell
from .estimates import Estimator
from .report import TARGETS, check_targets, markdown
from .run import estimate_speed, run_speed
from .settings import CellSkipped, Settings

__all__ = ["BACKBONES", "EDIT_PROMPTS", "FULL_SIZE", "METHODS", "TARGETS", "Cell", "CellSkipped", "Estimator",
           "Settings", "add_parser", "cell_options", "check_targets", "estimate_speed", "markdown", "measure_cell",
           "open_backbone", "run_speed"]
