"""``flowsteer benchmark`` and :func:`run_benchmark` (``tasks.benchmark``): every image x operator x method of a
folder restored, scored and summarised; resumable and shardable. One concern per file:

* ``run.py``: :func:`run_benchmark`, step by step: the arguments (and a parity preset), the model, the items,
  this process's share of them, then the report;
* ``state.py``: the images and the result folder: settings, resume (fingerprints), stale files, shards;
* ``report.py``: summary.md / .csv / .json, items.csv, grids and bar charts;
* ``parity.py``: parity presets as benchmark runs, and caption files;
* ``arguments.py``: the command line (``__main__.py``: ``python -m tasks.commands.benchmark``, for
  ``accelerate launch``).
"""

from .arguments import add_parser
from .run import parse_method_options, run_benchmark, split_methods, split_operators
from .state import IMAGE_SUFFIXES, TIMING_FIELDS, BenchmarkResult, find_images

__all__ = ["IMAGE_SUFFIXES", "TIMING_FIELDS", "BenchmarkResult", "add_parser", "find_images", "parse_method_options",
           "run_benchmark", "split_methods", "split_operators"]
