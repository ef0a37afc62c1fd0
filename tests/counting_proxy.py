"""A TCP forwarder on 127.0.0.1 that counts the bytes a GCS server sends to its clients.

Pointing `STORAGE_EMULATOR_HOST` at it (instead of at the server) measures what gcsfs really
downloads, HTTP headers included, without touching any client code: the test of "a step's rows
come from ranged reads" and the bytes-per-row column of benchmarks/data_loader.py.
"""

from __future__ import annotations

import socket
import threading


class CountingProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self.bytes_down = 0  # server -> client
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> int:
        """The count so far, and start again from zero."""
        with self._lock:
            count, self.bytes_down = self.bytes_down, 0
        return count

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, count: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.bytes_down += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
