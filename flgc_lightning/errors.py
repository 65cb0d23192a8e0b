"""Errors a user can cause. Entry points print their message and exit non-zero, no traceback."""


class UserError(Exception):
    """Bad input from the user: config, data path, checkpoint. The message says what to do."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class NonFiniteLossError(UserError):
    """Training diverged; the last good checkpoint is kept."""


class Stopped(UserError):
    """The run was asked to stop (SIGTERM, Ctrl-C, SLURM requeue) and saved a resumable checkpoint.

    Entry points print ``stopped: <message>`` and exit with 128 + the signal number, as shells report
    a process ended by that signal.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)
