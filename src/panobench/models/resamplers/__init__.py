"""panobench.models.resamplers."""
