"""Training: the synthetic world, data preparation and the training entry points."""
