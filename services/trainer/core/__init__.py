"""Logic of the trainer service; never imports grpc."""
