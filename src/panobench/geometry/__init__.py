"""panobench.geometry."""
