"""The training launcher's shared package: the training core here, config/, data/ and commands/ beside it (README: "A tour of the code")."""

__version__ = "0.1.0"
