"""Errors a user can cause: reported as one clear line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, file, tensor). The message is the whole report."""


class ConfigError(UserError):
    """A config key has a wrong name, type or value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}")
