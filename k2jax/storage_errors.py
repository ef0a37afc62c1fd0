"""A full disk, a file-size limit, a quota or a read-only file system, as one line.

These reach the CLI as an OSError from Python code, or as a TensorStore/Orbax error whose text
carries the OS message (`Failed to write ... File too large [os_error_code='27']`), several
causes deep. Either way the user's fix is the same (free space, raise the limit, write
elsewhere) and a traceback adds nothing: the CLI prints which and where, and exits 2.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import re
import sys
import traceback
import urllib.parse
import warnings
from typing import Any, Callable, Iterator, Optional

from k2jax.errors import UserError, one_line

_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (the file system's or `ulimit -f` limit)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
# How libraries that do not raise OSError (TensorStore, through Orbax) spell the same errors.
_TEXTS = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
          "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS}
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"((?:/|gs://)[^"]+)"')


def _causes(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen and len(seen) < 32:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def storage_failure(err: BaseException) -> Optional[str]:
    """'PROBLEM writing PATH' when `err` (or an exception it came from) is a storage failure;
    None otherwise."""
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in _PROBLEMS:
            where = cause.filename or "?"
            return f"{_PROBLEMS[cause.errno]} writing {where}"
        text = str(cause)
        code = _OS_CODE.search(text)
        found = (int(code.group(1)) if code and int(code.group(1)) in _PROBLEMS else
                 next((value for key, value in _TEXTS.items() if key in text), None))
        if found is not None:
            paths = _QUOTED_PATH.findall(text)
            return f"{_PROBLEMS[found]} writing {paths[-1] if paths else '?'}"
    return None


# A path the user gave that is the wrong kind of thing (a directory where a file belongs, a file
# where a directory belongs), unreadable, or missing: the OSError names it, and that is the report.
_PATH_PROBLEMS = {
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOTDIR: "a part of the path is a file, expected a directory",
    errno.EEXIST: "exists and is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "not found",
}


def path_failure(err: BaseException) -> Optional[str]:
    """'PATH: PROBLEM' when `err` (or an exception it came from) is an OSError about a named
    path of the wrong kind, without permission or missing, or gcsfs's word for the same about
    a gs:// object or bucket; None otherwise."""
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in _PATH_PROBLEMS and cause.filename:
            return f"{cause.filename}: {_PATH_PROBLEMS[cause.errno]}"
        problem = gcs_failure(cause)
        if problem is not None:
            return problem
    return None


def user_failure(err: BaseException) -> Optional[str]:
    """One line for a failure the user fixes (a full disk, a directory given as a file, a
    missing gs:// object): storage_failure's, else path_failure's; None for anything else."""
    return storage_failure(err) or path_failure(err)


# gcsfs names the request, not the user's path: `b/BUCKET/o/KEY` or an API URL ending so.
_GCS_REQUEST = re.compile(r"(?:^|[/\s])b/([^/?\s]+)(?:/o/?([^?\s]*))?")


def _raised_by(err: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    return bool(frames) and f"/{package}/" in frames[-1].filename


def _gcs_path(text: str) -> str:
    match = _GCS_REQUEST.search(text)
    if match is None:
        return text
    bucket, key = match.group(1), urllib.parse.unquote(match.group(2) or "")
    return f"gs://{bucket}/{key}" if key else f"gs://{bucket}"


def gcs_failure(err: BaseException) -> Optional[str]:
    """'gs://PATH: PROBLEM' for gcsfs's missing-object/bucket and permission errors, and one
    line for Google credentials problems; None for anything else."""
    name = type(err).__name__
    if name in ("DefaultCredentialsError", "RefreshError", "TransportError") and \
            type(err).__module__.startswith("google.auth"):
        return f"Google Cloud credentials: {one_line_text(err)}"
    if not _raised_by(err, "gcsfs"):
        return None
    text = str(err.args[0]) if err.args else str(err)
    first, _, detail = text.partition("\n")
    if isinstance(err, FileNotFoundError):
        return f"{_gcs_path(first)}: not found (no such object or bucket)"
    if isinstance(err, OSError) and first.startswith("Forbidden"):
        reason = f" ({one_line_text(detail)})" if detail.strip() else ""
        return f"{_gcs_path(first)}: permission denied{reason}"
    if name == "HttpError" and getattr(err, "code", None) in (401, 403):
        return f"Google Cloud Storage refused the request: {one_line_text(err)}"
    return None


def one_line_text(err: object) -> str:
    return " ".join(str(err).split())[:300]


@contextlib.contextmanager
def writing(path: object) -> Iterator[None]:
    """Names `path` in a storage failure raised inside that names no file of its own (a write
    to an open file object, a library's write_text)."""
    try:
        yield
    except Exception as err:
        problem = storage_failure(err)
        if problem is None or not problem.endswith(" writing ?"):
            raise
        raise UserError(f"{problem[:-1]}{path}") from err


def _is_orbax_coroutine(obj) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _is_background_noise(unraisable) -> bool:
    """Leftovers of Orbax work abandoned after its failure was reported: TensorStore
    completing a write after Orbax closed the asyncio loop that awaited it ('Event loop is
    closed', no object), or a restore's coroutine collected unfinished ('Exception ignored in:
    <coroutine object _read_array_index_and_device_put>')."""
    exc = unraisable.exc_value
    return _is_closed_loop(exc) or _is_orbax_coroutine(unraisable.object)


def _dropping_background_noise(previous_hook):
    """An unraisable hook that passes all but _is_background_noise's reports to `previous_hook`."""
    def unraisable_hook(unraisable) -> None:
        if not _is_background_noise(unraisable):
            previous_hook(unraisable)

    return unraisable_hook


def _is_closed_loop(exc: Optional[BaseException]) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _StorageRecordFilter(logging.Filter):
    """Drops a library's log record of a storage failure (Orbax's background save threads log
    one, with its traceback, per thread), keeping the first problem for the one-line report."""

    def __init__(self):
        super().__init__()
        self.first_problem: Optional[str] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:  # a warning may be one the library recovered from
            return True
        if record.name == "asyncio" and "orbax" in record.getMessage():
            # 'Task exception was never retrieved' of an Orbax task abandoned after its
            # failure was reported (the message names the coroutine, "defined at .../orbax/")
            return False
        exc = record.exc_info[1] if record.exc_info else None
        problem = storage_failure(exc) if exc is not None else None
        if problem is None:
            problem = storage_failure(Exception(record.getMessage()))
        if problem is None:
            return True
        self.first_problem = self.first_problem or problem
        return False


@contextlib.contextmanager
def quiet_background_storage_errors(loggers: tuple[str, ...] = ("absl", "asyncio"),
                                    until_exit: bool = False
                                    ) -> Iterator[_StorageRecordFilter]:
    """While inside: storage failures logged by background threads (Orbax, through absl) and the
    'Event loop is closed' reports that follow a failed asynchronous save are not printed; every
    other record and unraisable exception is. The failure itself still reaches the caller from
    the save's wait (the CLI prints it as one line); `.first_problem` of the yielded filter holds
    it in case a library swallowed it. On the way out, abandoned coroutines and tasks are
    collected while the filters still hold, not at interpreter exit. `until_exit` (a process
    that ends with this block): quiet_until_exit's filters go on before these come off, so a
    background thread reporting in between is never printed."""
    record_filter = _StorageRecordFilter()
    previous_hook = sys.unraisablehook
    unraisable_hook = _dropping_background_noise(previous_hook)
    for name in loggers:
        logging.getLogger(name).addFilter(record_filter)
    sys.unraisablehook = unraisable_hook
    try:
        yield record_filter
    finally:
        gc.collect()
        if until_exit:
            quiet_until_exit(loggers)  # chains to this block's hook, which then stays
        else:
            sys.unraisablehook = previous_hook
        for name in loggers:
            logging.getLogger(name).removeFilter(record_filter)


def quiet_until_exit(loggers: tuple[str, ...] = ("absl", "asyncio")) -> None:
    """For a process whose command has ended (after its result, or its one-line failure): the
    same filters as quiet_background_storage_errors, for the rest of the process. Orbax's
    threads may let go of a failed future only at interpreter exit ('_GatheringFuture exception
    was never retrieved', with the storage error's traceback), after the one-line message."""
    record_filter = _StorageRecordFilter()
    previous_hook = sys.unraisablehook
    unraisable_hook = _dropping_background_noise(previous_hook)
    previous_excepthook = sys.excepthook

    def excepthook(kind, value, traceback) -> None:
        # TensorStore's threads finishing a read for a loop Orbax has closed report it with
        # PyErr_Print, i.e. through sys.excepthook, not as an unraisable exception.
        if not _is_closed_loop(value):
            previous_excepthook(kind, value, traceback)

    for name in loggers:
        logging.getLogger(name).addFilter(record_filter)
    # The command has ended: a future or task asyncio finds unretrieved when it is collected
    # is work the command abandoned (a restore that failed and was recovered from).
    logging.getLogger("asyncio").addFilter(_drop_unretrieved)
    # Likewise a coroutine of that work collected before it ran ("RuntimeWarning: coroutine
    # '...' was never awaited", then "Enable tracemalloc ..."): seen once in CI's 10-repeat
    # full-disk test.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    sys.unraisablehook = unraisable_hook
    sys.excepthook = excepthook


def recover_from(action: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """(action(), None), or (None, one line saying why) when it failed with anything but a
    UserError: a checkpoint restore that the caller recovers from (the previous step).

    Orbax's other reads of a step that failed to restore are abandoned, and their leftovers are
    reported whenever they are collected, during the attempt or minutes later: a failed future
    nobody retrieved (asyncio's 'Future exception was never retrieved', seen once in 10 in CI's
    truncated-checkpoint test, after 'resumed from step 2'), a read coroutine closed unfinished
    ('Exception ignored in: <coroutine object _read_array_index_and_device_put>') and TensorStore
    finishing a read for the closed loop ('Event loop is closed'). The failure is reported once,
    as the line returned; so only that line is kept (the error's traceback held the abandoned
    loop), what it left is collected at once with those reports dropped, and after a failure they
    stay dropped for the rest of the process (TensorStore's threads report when they finish)."""
    asyncio_log = logging.getLogger("asyncio")
    already_quiet = _drop_unretrieved in asyncio_log.filters
    asyncio_log.addFilter(_drop_unretrieved)
    previous_hook = sys.unraisablehook
    unraisable_hook = _dropping_background_noise(previous_hook)
    sys.unraisablehook = unraisable_hook
    failure = None
    try:
        try:
            return action(), None
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the caller recovers from any failure
            failure = one_line(err)
        gc.collect()  # the error is gone, so what the abandoned reads left is unreachable now
        return None, failure
    finally:
        if failure is None:
            if sys.unraisablehook is unraisable_hook:
                sys.unraisablehook = previous_hook
            if not already_quiet:
                asyncio_log.removeFilter(_drop_unretrieved)


def _drop_unretrieved(record: logging.LogRecord) -> bool:
    # asyncio's message: 'Future exception was never retrieved', then lines naming the future
    return not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")
