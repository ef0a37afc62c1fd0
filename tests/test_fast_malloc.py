"""k2jax/aot/fast_malloc.py: a compile restarts itself once under TCMalloc when the host has it."""

import os
import subprocess
import sys
import textwrap

import pytest

from k2jax.aot import fast_malloc
from k2jax.aot.fast_malloc import (ENV, fast_malloc_library, malloc_in_use,
                                   restart_with_fast_malloc)


class Exec:
    def __init__(self):
        self.calls = []

    def __call__(self, path, argv, env):
        self.calls.append((path, argv, env))


def test_restarts_the_same_command_line_with_the_library_preloaded():
    execve = Exec()
    restart_with_fast_malloc({"LD_PRELOAD": "/x/other.so", "HOME": "/h"}, "/lib/libtcmalloc.so.4",
                             execve)
    [(path, argv, env)] = execve.calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so.4 /x/other.so"
    assert env[ENV] == "/lib/libtcmalloc.so.4" and env["HOME"] == "/h"


@pytest.mark.parametrize("environ", [{ENV: "0"}, {ENV: "/lib/libtcmalloc.so.4"},
                                     {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_no_restart_when_refused_or_already_fast(environ):
    execve = Exec()
    restart_with_fast_malloc(environ, "/lib/libtcmalloc.so.4", execve)
    assert execve.calls == []


def test_no_restart_without_a_library(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_malloc, "LIBRARY_DIRS", (str(tmp_path),))
    execve = Exec()
    restart_with_fast_malloc({}, None, execve)
    assert execve.calls == []


def test_finds_tcmalloc_before_jemalloc(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert fast_malloc_library((str(tmp_path),)) == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert fast_malloc_library((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")


def test_names_the_malloc_in_use():
    assert malloc_in_use({}) == "glibc"
    assert malloc_in_use({"LD_PRELOAD": "/a/b.so /u/libtcmalloc_minimal.so.4"}) == \
        "libtcmalloc_minimal.so.4"


@pytest.mark.skipif(fast_malloc_library() is None,
                    reason="no TCMalloc or jemalloc installed (apt install libtcmalloc-minimal4)")
def test_a_real_restart_runs_once_under_the_library(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from k2jax.aot.fast_malloc import restart_with_fast_malloc, malloc_in_use
        print("start", sys.argv[1:], flush=True)
        restart_with_fast_malloc()
        print("running under", malloc_in_use(), sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    library = os.path.basename(fast_malloc_library())
    assert out == ["start ['--flag', 'x y']", "start ['--flag', 'x y']",
                   f"running under {library} ['--flag', 'x y']"]
