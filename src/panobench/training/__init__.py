"""panobench.training."""
