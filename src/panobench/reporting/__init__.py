"""panobench.reporting: aggregate per-cell records into results.csv and build the comparison report.

Import the submodules directly (``aggregate``, ``tables``, ``plots``, ``html``); importing this package does not
pull in matplotlib.
"""
