"""Small shared helpers: atomic I/O and reproducibility."""
