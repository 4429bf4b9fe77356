"""The ``flowsteer`` commands, one module per command (a package where it has several parts), and the command line.

``restore``, ``generate``, ``edit``, ``design``, ``calibrate``, ``benchmark`` (a package: run, state, report, parity,
arguments), ``speed`` (a package: run, settings, backbones, cells, report, arguments) and ``listings`` (``flowsteer
operators / methods / models / presets``); ``cli.py`` gathers their ``add_parser`` into ``flowsteer``. Each command is
also a Python function, ``tasks.restore(...)``, ``tasks.benchmark(...)``, ...: see :mod:`tasks`. Nothing is imported
here, so that ``import tasks`` stays light.
"""
