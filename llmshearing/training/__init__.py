"""Training entry point support: configuration, builders and the metrics log."""
