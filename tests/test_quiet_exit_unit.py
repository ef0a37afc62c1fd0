"""After a command's one-line error the process stays quiet until it exits: Orbax work abandoned
after a failure may still report a closed event loop from TensorStore's threads, as an
unraisable exception or through sys.excepthook (PyErr_Print); any other error still prints."""

import logging
import sys

from k2jax.storage_errors import quiet_until_exit


def test_closed_loop_reports_are_dropped_and_other_errors_kept(monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    for name in ("absl", "asyncio"):  # its log filters come off again after the test
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    quiet_until_exit()
    closed = RuntimeError("Event loop is closed")
    sys.excepthook(RuntimeError, closed, None)

    class Unraisable:
        exc_type, exc_value, exc_traceback = RuntimeError, closed, None
        err_msg, object = None, print  # a callback object, not None

    sys.unraisablehook(Unraisable)
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real bug"), None)
    assert "a real bug" in capsys.readouterr().err


def test_unretrieved_asyncio_leftovers_are_dropped(monkeypatch, caplog):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    quiet_until_exit()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.error("Future exception was never retrieved")
    asyncio_log.error("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_unawaited_coroutines_are_dropped_and_other_warnings_kept(monkeypatch):
    import gc
    import warnings

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])

    async def abandoned():
        pass

    with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
        warnings.simplefilter("always")
        quiet_until_exit()
        coroutine = abandoned()
        del coroutine
        gc.collect()
        warnings.warn("something else", RuntimeWarning)
    assert [str(w.message) for w in seen] == ["something else"]
