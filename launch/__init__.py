"""Thin command-line entry points: `python -m launch.<name>`."""
