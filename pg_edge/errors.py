"""Errors that mean "your input is wrong", as opposed to bugs.

Every tool raises `PgEdgeError` (or a subclass) with a one-line message that names the
problem (the file, the key, the value); the CLI prints it and exits non-zero, never a traceback.
"""


class PgEdgeError(Exception):
    """Bad input: a file, a checkpoint, a config, an image or a setting we cannot use."""


class CheckpointError(PgEdgeError):
    """A checkpoint that is missing, truncated, of another model, or in a refused format."""


class ImageError(PgEdgeError):
    """An image that cannot be read or decoded."""
