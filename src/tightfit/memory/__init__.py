"""The memory engine: tracker, estimator, planner, batch-size search, out-of-memory handling."""
