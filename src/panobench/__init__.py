"""panobench: a reproducible benchmark harness for panoramic (360°) vision-language models."""

__version__ = "0.1.0"
