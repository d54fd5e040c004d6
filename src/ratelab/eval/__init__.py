"""Evaluation: classification metrics, reports. Pure code; nothing here imports the trainer."""
