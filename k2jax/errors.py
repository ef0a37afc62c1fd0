"""Errors a user can cause: reported as one clear line and a non-zero exit, never a traceback."""

import re


class UserError(Exception):
    """Bad input from the user (config, file, tensor). The message is the whole report."""


class ConfigError(UserError):
    """A config key has a wrong name, type or value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}")


# Where a TensorStore error's message turns into debris: the pointer to its details, the repr of
# a bound method, or a store's own repr (its spec runs over many lines; an error may quote it).
_TENSORSTORE_DETAILS = re.compile(
    r"\.?\s*See full TensorStore details:|<bound method pybind11|<?\bTensorStore\(\{")


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (library errors can run to
    pages; a report line must stay one line)."""
    text = str(err).strip()
    # Orbax appends the repr of a TensorStore method, whose spec runs over many lines: the
    # first of them is debris ("<bound method pybind11... of TensorStore({"), not information.
    text = _TENSORSTORE_DETAILS.split(text, maxsplit=1)[0].rstrip(" .:").splitlines()
    text = f"{type(err).__name__}: {text[0] if text else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
