"""`python -m meterai` is the `meterai` command."""

from meterai.cli import main

main()
