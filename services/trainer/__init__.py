"""Trainer service: torch training jobs, the model registry and promotion."""
