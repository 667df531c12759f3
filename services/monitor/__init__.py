"""Monitor service: decision-log summaries, drift, alerts and offline policy evaluation."""
