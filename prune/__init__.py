"""topoprune: prune CNN channels by feature entropy and other scorers."""
__version__ = "0.1.0"
