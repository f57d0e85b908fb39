"""panobench.data."""
