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


class _Checkpoints:
    """Steps 2 and 4 of a run, as restore_newest_intact sees them (4 fails to restore)."""
    directory = "checkpoints"

    def set_aside(self, step):
        return f"damaged_checkpoints/{step}"


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

    def restore(step):
        if step == 4:
            leave_a_failed_future()
            raise ValueError("OUT_OF_RANGE: byte range not valid")
        return "state"

    logged = []
    assert restore_newest_intact(_Checkpoints(), [2, 4], restore, logged.append) == ("state", 2)
    leave_a_failed_future()  # collected later, after the run went on
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "checkpoint 4 failed to restore" in logged[0]


def _orbax_like_read():
    """A coroutine defined in a file under an `orbax/` folder, as Orbax's reads are, that
    raises when closed unfinished (Orbax's `_read_array_index_and_device_put` re-raises)."""
    source = ("async def read(wait):\n"
              "    try:\n"
              "        await wait\n"
              "    except BaseException as err:\n"
              "        raise Exception('Encountered error while reading array index') from err\n")
    namespace = {}
    exec(compile(source, "/site-packages/orbax/checkpoint/serialization.py", "exec"), namespace)
    return namespace["read"]


def test_a_recovered_restore_leaves_no_unfinished_read_report(monkeypatch):
    """The library's caller (a Trainer, not the CLI) sees no 'Exception ignored in: <coroutine
    ...>' for the reads a failed restore abandoned, when they are collected; an unraisable
    exception of anything else still reaches the hook that was there."""
    import asyncio
    import gc

    from k2jax.checkpoint.set_aside import restore_newest_intact

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    read = _orbax_like_read()

    def abandon_a_read():
        loop = asyncio.new_event_loop()
        task = loop.create_task(read(loop.create_future()))
        loop.run_until_complete(asyncio.sleep(0))  # the read is waiting on its future
        loop.close()  # as Orbax's run_sync closes its loop when the restore fails
        return task

    abandon_a_read()
    gc.collect()
    assert len(reported) == 1 and "orbax" in reported[0].object.cr_code.co_filename
    reported.clear()

    def restore(step):
        if step == 4:
            held = abandon_a_read()  # held by the error's traceback, as Orbax's loop is
            raise ValueError(f"OUT_OF_RANGE: byte range not valid ({held is not None})")
        return "state"

    logged = []
    assert restore_newest_intact(_Checkpoints(), [2, 4], restore, logged.append) == ("state", 2)
    abandon_a_read()  # collected later, after the run went on
    gc.collect()
    assert reported == []

    class Bug:
        exc_type, exc_value, exc_traceback = ValueError, ValueError("a bug elsewhere"), None
        err_msg, object = None, print

    sys.unraisablehook(Bug)  # still reaches the hook that was there
    assert reported == [Bug]
    assert "checkpoint 4 failed to restore (ValueError: OUT_OF_RANGE" in logged[0]
