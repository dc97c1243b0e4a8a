"""Fixtures: a real `keepwarm serve` per test, in a private runtime
directory, and child interpreters driven line by line."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
WAIT = 60.0


def keepwarm_bin() -> str:
    return os.environ.get("KEEPWARM_BIN") or str(ROOT / "target" / "debug" / "keepwarm")


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Lines:
    """The lines a process prints, collected by a thread; wait for one."""

    def __init__(self, stream) -> None:
        self.lines: List[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, ""):
            with self.changed:
                self.lines.append(raw.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # type: ignore[arg-type]
            self.changed.notify_all()

    def wait_for(self, needle: str, n: int = 1, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [l for l in self.lines if l is not None and needle in l]
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] is None):
                    raise AssertionError("no line #%d with %r; got %r" % (n, needle, self.lines))
                self.changed.wait(left)

    def count(self, needle: str) -> int:
        with self.changed:
            return sum(1 for l in self.lines if l is not None and needle in l)

    def all(self) -> List[str]:
        with self.changed:
            return [l for l in self.lines if l is not None]


class Serve:
    """A running `keepwarm serve --socket SOCKET` (without `--socket` when
    `socket_path` is None: the default socket of the runtime directory)."""

    def __init__(self, runtime: Path, socket_path: Optional[Path], extra: Optional[List[str]] = None) -> None:
        self.runtime = runtime
        self.socket = socket_path or runtime / "keepwarm" / "serve.sock"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
        self.env.pop("KEEPWARM_SOCKET", None)
        where = ["--socket", str(socket_path)] if socket_path else []
        self.process = subprocess.Popen(
            [keepwarm_bin(), "serve"] + where + (extra or []),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = Lines(self.process.stdout)
        self.output.wait_for("serving caches")
        deadline = time.monotonic() + WAIT
        while not _answers(str(self.socket)):
            assert time.monotonic() < deadline and self.process.poll() is None, self.output.all()
            time.sleep(0.01)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [keepwarm_bin(), "--socket", str(self.socket)] + list(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    def stats(self, cache: str) -> Dict:
        out = self.cli("stats", cache, "--json")
        assert out.returncode == 0, out
        return json.loads(out.stdout)[0]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=WAIT)


class Child:
    """A child interpreter running `body`, with lines to stdin and from
    stdout (stderr apart)."""

    def __init__(self, body: str, env: Dict[str, str], cwd: Optional[Path] = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", body],
            env=env,
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = Lines(self.process.stdout)
        self.err = Lines(self.process.stderr)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        if self.process.stdin:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        code = self.process.wait(timeout=WAIT)
        self.out.thread.join(timeout=WAIT)
        self.err.thread.join(timeout=WAIT)
        return code

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=WAIT)


@pytest.fixture
def runtime():
    with tempfile.TemporaryDirectory(prefix="kw-py-") as d:
        os.chmod(d, 0o700)
        yield Path(d)


@pytest.fixture
def host(runtime):
    h = Serve(runtime, runtime / "host.sock")
    yield h
    h.stop()


@pytest.fixture
def env(host):
    """The environment of a child interpreter that uses `host`."""
    return dict(
        os.environ,
        XDG_RUNTIME_DIR=str(host.runtime),
        KEEPWARM_SOCKET=str(host.socket),
        PYTHONDONTWRITEBYTECODE="1",
    )


@pytest.fixture
def here(host, monkeypatch):
    """This interpreter talks to `host`, with a fresh client state."""
    from keepwarm import _host, _memo

    monkeypatch.setenv("KEEPWARM_SOCKET", str(host.socket))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(host.runtime))
    monkeypatch.setattr(_memo, "_HOST", _host.Host())
    monkeypatch.setattr(_memo, "_CACHES", {})
    return host
