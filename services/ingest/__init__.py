"""Ingest service: sources into the offline and online feature stores and the options store."""
