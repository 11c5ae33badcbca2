"""Shared pieces of the training launcher: config, dist, data, model, loop, checkpoint, logger."""

__version__ = "0.1.0"
