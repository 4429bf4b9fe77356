"""``flowsteer benchmark`` (interim: the whole command in run.py)."""

from .run import *  # noqa: F401,F403
from .run import TIMING_FIELDS, _Item, _wait_for, add_parser, run, run_benchmark  # noqa: F401
