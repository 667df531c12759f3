"""Predictor replica: real-time offer ranking and online learning."""
