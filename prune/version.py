"""The package version, in one place."""

__version__ = "0.1.0"
"""The installed version of topoprune (what `pyproject.toml` reads, and run.json records)."""
