"""`python -m panobench` entry point."""

from panobench.cli import main

raise SystemExit(main())
