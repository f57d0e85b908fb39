"""panobench.evaluation."""
