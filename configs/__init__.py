"""Experiment configs: `configs/<name>.py` each define `get_config()`."""
