"""Error types users can catch. Each message says what went wrong, where, and what to do."""


class BertrayError(Exception):
    """Base class of every error bertray raises on purpose."""


class ConfigError(BertrayError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class CheckpointError(BertrayError):
    """A checkpoint directory is missing, incomplete, corrupt or does not fit the model."""


class TrainingDiverged(BertrayError):
    """The loss or the gradient norm became non-finite; the run stops before it saves such a model."""


class CorpusError(BertrayError):
    """A pretraining corpus cannot be found, reached or read."""


class TaskDataError(BertrayError, ValueError):
    """A fine-tuning data file is malformed (the message names the file and line)."""


def check(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError("key: message")` unless `condition` holds: the one validation helper of
    every config dataclass, here so that the data layer can validate without importing the config."""
    if not condition:
        raise ConfigError(f"{key}: {message}")
