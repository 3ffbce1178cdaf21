"""Errors a user can act on: each message names what went wrong and where, in one line."""


class EvlmError(Exception):
    """Base of every error evlm reports to the user without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SpecError(EvlmError):
    """A spec is invalid: the message names the key path, the line and what was expected."""


class CheckpointError(EvlmError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class DataError(EvlmError):
    """A dataset, answer list or tokenizer is missing or malformed."""


class TrainingError(EvlmError):
    """Training cannot go on: a non-finite loss, or a stage input that does not fit."""
