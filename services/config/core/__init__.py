"""Logic of the config service; never imports grpc."""
