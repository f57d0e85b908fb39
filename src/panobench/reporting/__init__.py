"""panobench.reporting."""
