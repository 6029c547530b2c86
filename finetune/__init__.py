"""Fine-tuning, schedules and evaluation metrics (never imports scoring)."""
