"""``flowsteer speed`` (interim: the whole command in run.py)."""

from .run import *  # noqa: F401,F403
from .run import (Cell, CellSkipped, Settings, add_parser, cell_options, check_targets, markdown, measure_cell,  # noqa: F401
                  open_backbone, run, run_speed)
