"""Errors caused by the user's input, reported as one line and exit code 2."""


class UserError(Exception):
    """Invalid input from the user: a file, a value or an option.

    The message names the file or value and how to fix it. The CLI
    prints it without a traceback and exits with code 2.
    """


class DatasetError(UserError):
    """A dataset file is missing, unreadable or inconsistent."""


class ConfigError(UserError):
    """An option, a class map or a preset contains an invalid value."""
