"""Building the model a run trains."""
