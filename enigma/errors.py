"""The project's error for bad input: the CLI shows it as one line naming the fix."""


class InputError(ValueError):
    """Something the user gave (a flag, a config key, a file) is wrong; the message says how."""
