"""Exceptions that the CLI turns into one clear line and a non-zero exit."""


class PanobenchError(Exception):
    """Base class: the message names the file/row/key at fault and is shown to the user as is."""


class InputError(PanobenchError):
    """Bad input data: missing/corrupt image, malformed CSV, path escaping the data root."""


class ConfigError(PanobenchError):
    """Bad configuration: unknown key, wrong type, value out of range."""


class CheckpointError(PanobenchError):
    """A checkpoint that is unreadable, of another architecture, or not a checkpoint at all."""


class TrainingError(PanobenchError):
    """A training run that cannot continue (non-finite loss, empty trainable set, ...)."""
