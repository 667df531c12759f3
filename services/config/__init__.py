"""Config service: versioned deployment specs, streamed live to predictor replicas."""
