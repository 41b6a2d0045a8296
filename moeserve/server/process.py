"""Start `moeserve serve` in a subprocess on a free localhost port and wait until /health (or /ready) answers.

Used by the end-to-end tests and `moeserve check`: `with ServerProcess([model, flags...]) as s:` gives
`s.base_url` ("http://127.0.0.1:PORT/v1") and always stops the process on the way out (SIGTERM: the drain).
Standard library only, so client-side tools can use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, serve_args: list[str], startup_timeout_s: float = 180.0, env: dict | None = None,
                 wait_path: str = "/health", stop_timeout_s: float = 15.0, command: list[str] | None = None,
                 keep_log: str | None = None, own_group: bool = False, name: str = "moeserve serve"):
        """command: what serves (default `python -m moeserve.cli serve`; a benchmark gives vLLM's); keep_log: a
        path the server's output is copied to when it stops; own_group: the server in a process group of its
        own, killed whole once it has stopped (a benchmark's engine processes must not outlive it on the GPUs)."""
        self.own_group = own_group
        self.command = command or [sys.executable, "-m", "moeserve.cli", "serve"]
        self.name = name  # in errors
        self.keep_log = keep_log
        self.serve_args = list(serve_args)
        self.startup_timeout_s = startup_timeout_s
        self.wait_path, self.stop_timeout_s = wait_path, stop_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moeserve-server-", suffix=".log", delete=False)

    def __enter__(self) -> "ServerProcess":
        cmd = [*self.command, *self.serve_args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     process_group=0 if self.own_group else None)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.wait_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} did not answer {self.wait_path} after {self.startup_timeout_s:.0f}s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if self.own_group and self.proc is not None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever the server started and left behind
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        if self.keep_log:
            import shutil

            shutil.copyfile(self._log.name, self.keep_log)
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
