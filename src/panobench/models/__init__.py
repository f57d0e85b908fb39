"""panobench.models."""
