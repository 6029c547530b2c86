"""The training loop, fine-tuning, schedules, in-memory batches, evaluation metrics and DDP
(never imports scoring or prune)."""
