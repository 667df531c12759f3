"""Logic of the ingest service; never imports grpc."""
