"""`python -m autoresearch` runs the CLI."""

from .cli import main

main()
