"""panobench.measurement."""
