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
    # as asyncio words it: the first line, then the future's
    asyncio_log.error("Future exception was never retrieved\n"
                      "future: <Future finished exception=ValueError('OUT_OF_RANGE')>")
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished ...>")
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


def test_a_command_that_ends_the_process_hands_over_without_a_gap(monkeypatch):
    """`k2jax` run as a process: the filters that stay until exit are on before the command's
    come off, so a closed-loop report from a thread right after the command is never printed
    (a report landing between the two would print: a likely cause of one failure in the slow
    group, output lost)."""
    import warnings

    from k2jax.storage_errors import quiet_background_storage_errors

    printed = []
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])

    class Closed:
        exc_type, exc_value, exc_traceback = RuntimeError, RuntimeError("Event loop is closed"), None
        err_msg, object = None, print

    class Bug(Closed):
        exc_value = ValueError("a real bug")

    with warnings.catch_warnings():  # quiet_until_exit's warning filter comes off afterwards
        with quiet_background_storage_errors(until_exit=False):
            pass
        assert sys.unraisablehook == printed.append  # in-process use: all restored
        with quiet_background_storage_errors(until_exit=True):
            pass
        sys.unraisablehook(Closed)
        sys.unraisablehook(Bug)
    assert printed == [Bug]


def test_a_recovered_restore_leaves_no_unretrieved_future_report(monkeypatch, caplog):
    """A restore that failed left a future whose failure nobody retrieves (Orbax's other reads
    of the damaged step); the run goes on from the previous step without asyncio printing it
    when it is collected. Before the restore fails, such a report still prints."""
    import asyncio
    import gc

    from k2jax.checkpoint.set_aside import restore_newest_intact

    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])

    def leave_a_failed_future():
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(ValueError("OUT_OF_RANGE: byte range not valid"))
        loop.close()

    leave_a_failed_future()
    gc.collect()
    assert any("never retrieved" in r.getMessage() for r in caplog.records)
    caplog.clear()

    class Checkpoints:
        directory = "checkpoints"

        def set_aside(self, step):
            return f"damaged_checkpoints/{step}"

    def restore(step):
        if step == 4:
            leave_a_failed_future()
            raise ValueError("OUT_OF_RANGE: byte range not valid")
        return "state"

    logged = []
    assert restore_newest_intact(Checkpoints(), [2, 4], restore, logged.append) == ("state", 2)
    leave_a_failed_future()  # collected later, after the run went on
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "checkpoint 4 failed to restore" in logged[0]
