"""``python -m tasks.commands.benchmark ...`` / ``accelerate launch -m tasks.commands.benchmark ...``: the
``flowsteer benchmark`` command, one process per GPU (``--debug`` may come anywhere)."""

import sys

from tasks.commands.cli import main

arguments = sys.argv[1:]
sys.exit(main([*(["--debug"] if "--debug" in arguments else []), "benchmark",
               *(a for a in arguments if a != "--debug")]))
