"""Errors raised for bad user input, bad files and bad configs.

Every error names the thing that is wrong (a file, a field, an argument) so a
user can fix it without reading a traceback from deep inside torch.
"""


class NextStepError(Exception):
    """Base class of the errors this package raises on purpose."""


class CheckpointError(NextStepError, ValueError):
    """A checkpoint file or folder is missing, corrupt, or does not fit the model."""


class ConfigError(NextStepError, ValueError):
    """A config.json (or a config dict) holds a field or value we do not understand."""
