"""Logic of the monitor service; never imports grpc."""
