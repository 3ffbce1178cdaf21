"""The one training loop (progress, checkpoints, resume, NaN guard, log.csv) and its processes."""
