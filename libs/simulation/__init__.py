"""Decision quality by simulation: seeded environments whose take-up rates are known, driven
through the shared policy (libs/policy), scored against an oracle that knows the rates."""
