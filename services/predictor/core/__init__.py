"""Decision logic of the predictor; never imports grpc."""
