"""The decision path as a library: context derivation, eligibility, scorers, plugins, the prepared
deployment and the ranking step with its exact propensities. Plain arrays of statistics in,
ranked offers out; no grpc, no Redis. The predictor, the simulation and the monitor's offline
evaluation all decide through it."""
