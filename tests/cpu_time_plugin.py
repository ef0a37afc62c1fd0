"""Opt-in pytest plugin: CPU seconds per test, so the suite's cost can be measured on a loaded
machine (wall time there depends mostly on the other users; CPU time far less).

    PYTHONPATH=. python -m pytest -p tests.cpu_time_plugin --cpu-top 15    # top 15 at the end
    PYTHONPATH=. python -m pytest -p tests.cpu_time_plugin --cpu-json cpu.json  # every test, JSON

(from the repository root; `-p` plugins are imported before conftest.py puts tests/ on sys.path,
hence the package path `tests.cpu_time_plugin`.)

Per test: setup + call + teardown, as this process's CPU time (`time.process_time()`: user +
system of all its threads, so XLA's compile threads count) plus the CPU time of child processes
reaped meanwhile (`getrusage(RUSAGE_CHILDREN)`: the CLI and multi-host subprocesses). A
module- or session-scoped fixture is charged to the first test that uses it. Collection
(imports of jax, torch, ...) is reported as one line of its own.
"""

import json
import resource
import time

import pytest


def _cpu_seconds() -> tuple[float, float]:
    """(this process, reaped children) CPU seconds, user + system."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def pytest_addoption(parser):
    group = parser.getgroup("cpu_time_plugin")
    group.addoption("--cpu-top", type=int, default=15, help="print the N most CPU-costly tests")
    group.addoption("--cpu-json", default=None, help="write every test's CPU seconds to this file")


class _CpuTimes:
    def __init__(self, config):
        self.config = config
        self.by_test: dict[str, dict] = {}
        self.collection = (0.0, 0.0)
        self._collect_start = _cpu_seconds()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):
        start = _cpu_seconds()
        yield
        end = _cpu_seconds()
        # Imports done before collection (pytest, conftest) are counted from plugin start.
        self.collection = (end[0] - self._collect_start[0], end[1] - start[1])

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        start, wall = _cpu_seconds(), time.perf_counter()
        yield
        end = _cpu_seconds()
        self.by_test[item.nodeid] = {
            "self_s": round(end[0] - start[0], 3),
            "children_s": round(end[1] - start[1], 3),
            "cpu_s": round(end[0] - start[0] + end[1] - start[1], 3),
            "wall_s": round(time.perf_counter() - wall, 3),
            "slow": item.get_closest_marker("slow") is not None,
        }

    def pytest_terminal_summary(self, terminalreporter):
        tests = sorted(self.by_test.items(), key=lambda kv: -kv[1]["cpu_s"])
        write = terminalreporter.write_line
        terminalreporter.section("CPU seconds (process + subprocesses)")
        total = sum(t["cpu_s"] for _, t in tests)
        slow = sum(t["cpu_s"] for _, t in tests if t["slow"])
        write(f"collection: {sum(self.collection):.1f} s; {len(tests)} tests: {total:.1f} s "
              f"(slow-marked: {slow:.1f} s, others: {total - slow:.1f} s)")
        for nodeid, t in tests[: self.config.getoption("cpu_top")]:
            write(f"{t['cpu_s']:8.1f} s  (children {t['children_s']:6.1f})  {nodeid}")
        path = self.config.getoption("cpu_json")
        if path:
            with open(path, "w") as f:
                json.dump({"collection_s": self.collection, "tests": self.by_test}, f, indent=1)


def pytest_configure(config):
    config.pluginmanager.register(_CpuTimes(config), "cpu_time_plugin_recorder")
