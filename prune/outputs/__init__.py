"""Outputs: atomic files, checkpoints, the output folder, reports."""
