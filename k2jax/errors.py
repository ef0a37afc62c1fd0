"""Errors a user can cause: reported as one clear line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, file, tensor). The message is the whole report."""


class ConfigError(UserError):
    """A config key has a wrong name, type or value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}")


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (library errors can run to
    pages; a report line must stay one line)."""
    text = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {text[0] if text else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
