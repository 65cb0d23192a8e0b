"""Errors a user can cause. Entry points print their message and exit non-zero, no traceback."""


class UserError(Exception):
    """Bad input from the user: config, data path, checkpoint. The message says what to do."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class NonFiniteLossError(UserError):
    """Training diverged; the last good checkpoint is kept."""
