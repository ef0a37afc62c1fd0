"""A full disk, a file-size limit, a quota or a read-only file system, as one line.

These reach the CLI as an OSError from Python code, or as a TensorStore/Orbax error whose text
carries the OS message (`Failed to write ... File too large [os_error_code='27']`), several
causes deep. Either way the user's fix is the same (free space, raise the limit, write
elsewhere) and a traceback adds nothing: the CLI prints which and where, and exits 2.
"""

from __future__ import annotations

import errno
import re
from typing import Optional

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
