"""Training entry point support: configuration, builders, the metrics log and the shipped demo recipes."""
