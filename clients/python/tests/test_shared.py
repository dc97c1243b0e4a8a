"""The shared tier (`keepwarm serve --shared redis://…`) as a Python user sees
it: hosts on one real `redis-server` share @keepwarm.memo's entries under the
function's source text, an edited function never reads them, and a cache
opened without a code is never written to Redis.

Every test starts its own `redis-server` (the Debian package) on a free
loopback port and its own hosts, each in a private runtime directory. They
synchronize on the hosts' figures (`shared_writes`, `status`'s
`shared.state`), polled with a deadline, never on sleeps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from conftest import WAIT, Child, Lines, Serve

SCRIPT = textwrap.dedent(
    """\
    import keepwarm

    @keepwarm.memo
    def square(x):
        print("Squaring", x)
        return x * x

    print(square(10))
    print(square(11))
    """
)

# The same script with square's body edited (a comment: the result is the
# same, the source text is not).
EDITED = SCRIPT.replace(
    '    print("Squaring", x)\n',
    '    print("Squaring", x)\n    # edited: the same result, another source text\n',
)
assert EDITED != SCRIPT

# Every shared entry of the cache `square`:
# `{prefix}:v1:{plugin}:{cache}:{code}:{shape}:{key}`.
SQUARE_KEYS = "keepwarm:v1:*:square:*"


class RedisError(Exception):
    """An error reply (`-ERR …`) from Redis."""


def _read_reply(f) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("redis-server closed the connection mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise OSError("not a RESP reply: %r" % line)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A `redis-server` on a free port of 127.0.0.1, saving nothing, its
    directory a temporary one; `command` is a tiny RESP client (one
    connection per command)."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not on PATH: the shared-tier tests need a real Redis server; "
                "install the Debian package redis-server (apt-get install redis-server)",
                pytrace=False,
            )
        why = ""
        # The port is free when asked, not necessarily when Redis binds it
        # (a parallel test may take it first): try another.
        for _ in range(5):
            self.port = _free_port()
            self.process = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--daemonize", "no"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.output = Lines(self.process.stdout)
            deadline = time.monotonic() + WAIT
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    if self.command("PING") == "PONG":
                        return
                except (OSError, RedisError):
                    pass
                time.sleep(0.01)
            self.kill()
            why = "\n".join(self.output.all())
        raise AssertionError("redis-server did not start on a free port in 5 tries; the last said:\n" + why)

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d" % self.port

    def command(self, *args: Any) -> Any:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(request)
            with s.makefile("rb") as f:
                return _read_reply(f)

    def keys(self, pattern: str) -> List[bytes]:
        return sorted(self.command("KEYS", pattern))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=WAIT)


@pytest.fixture
def redis():
    with tempfile.TemporaryDirectory(prefix="kw-redis-") as d:
        server = RedisServer(Path(d))
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def shared_serve(redis):
    """Starts `keepwarm serve --shared URL` hosts on `redis`, each with its
    own runtime directory and socket, and waits until each is connected."""
    hosts: List[Serve] = []
    dirs: List[tempfile.TemporaryDirectory] = []

    def start() -> Serve:
        d = tempfile.TemporaryDirectory(prefix="kw-py-")
        dirs.append(d)
        runtime = Path(d.name)
        os.chmod(runtime, 0o700)
        host = Serve(runtime, runtime / "host.sock", ["--shared", redis.url])
        hosts.append(host)
        eventually("%s's shared tier is connected" % host.socket, lambda: shared_state(host) == "connected")
        return host

    yield start
    for host in hosts:
        host.stop()
    for d in dirs:
        d.cleanup()


def eventually(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "not within %g s: %s" % (WAIT, what)
        time.sleep(0.02)


def shared_state(host: Serve) -> Any:
    out = host.cli("status", "--json")
    assert out.returncode == 0, out
    return (json.loads(out.stdout).get("shared") or {}).get("state")


def figure(host: Serve, cache: str, field: str) -> int:
    stats = host.stats(cache)
    assert stats["name"] == cache, stats
    assert isinstance(stats.get(field), int), "stats of %s has no integer %s: %r" % (cache, field, stats)
    return stats[field]


def wait_writes(host: Serve, cache: str, n: int) -> None:
    eventually(
        "%d entries of %s written to Redis (shared_writes)" % (n, cache),
        lambda: figure(host, cache, "shared_writes") >= n,
    )


def run_script(path: Path, host: Serve) -> List[str]:
    """Runs the script at `path` in a fresh interpreter against `host`;
    its output lines."""
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=str(host.runtime),
        KEEPWARM_SOCKET=str(host.socket),
        PYTHONDONTWRITEBYTECODE="1",
    )
    child = Child("import runpy; runpy.run_path(%r, run_name='__main__')" % str(path), env)
    assert child.finish() == 0, child.err.all()
    assert not child.err.all(), child.err.all()
    return child.out.all()


def code_of(key: bytes) -> bytes:
    """The `{code}` segment of a shared key, checked to be 16 hex digits."""
    parts = key.split(b":", 6)
    assert len(parts) == 7, key
    code = parts[4]
    assert len(code) == 16 and all(c in b"0123456789abcdef" for c in code.lower()), key
    return code


def seed_host(shared_serve, tmp_path: Path) -> Serve:
    """Host A, with square(10) and square(11) computed there and written to
    Redis."""
    script = tmp_path / "square.py"
    script.write_text(SCRIPT)
    a = shared_serve()
    assert run_script(script, a) == ["Squaring 10", "100", "Squaring 11", "121"]
    wait_writes(a, "square", 2)
    return a


def test_a_second_host_answers_from_redis_without_computing(shared_serve, redis, tmp_path):
    seed_host(shared_serve, tmp_path)
    keys = redis.keys(SQUARE_KEYS)
    assert len(keys) == 2, keys
    assert len({code_of(k) for k in keys}) == 1, keys

    b = shared_serve()
    out = run_script(tmp_path / "square.py", b)
    assert not any("Squaring" in line for line in out), out
    assert out == ["100", "121"]
    assert figure(b, "square", "shared_hits") == 2


def test_an_edited_function_never_reads_the_old_ones_entries(shared_serve, redis, tmp_path):
    a = seed_host(shared_serve, tmp_path)
    edited = tmp_path / "edited" / "square.py"
    edited.parent.mkdir()
    edited.write_text(EDITED)

    c = shared_serve()
    assert run_script(edited, c) == ["Squaring 10", "100", "Squaring 11", "121"]
    # C asked Redis (it is connected) and found nothing under its code.
    assert figure(c, "square", "shared_hits") == 0
    assert figure(c, "square", "shared_misses") >= 2
    # Its own entries go to Redis beside A's, under another code.
    wait_writes(c, "square", 2)
    keys = redis.keys(SQUARE_KEYS)
    assert len(keys) == 4, keys
    assert len({code_of(k) for k in keys}) == 2, keys
    assert figure(a, "square", "shared_writes") == 2


def test_a_cache_opened_without_a_code_is_never_written_to_redis(shared_serve, redis):
    # The raw protocol, with the client's own connection class (no
    # @keepwarm.memo, which always sends a code).
    from keepwarm._host import Connection, b64

    def ok(answer: Dict[str, Any]) -> Dict[str, Any]:
        assert answer.get("ok") is True, answer
        return answer["result"]

    a = shared_serve()
    conn = Connection(str(a.socket))
    try:
        # `plain` first: the writer writes in order, so once the coded
        # cache's entry is written, plain's would have been too.
        for cache, code in [("plain", None), ("coded", "00c0ffee12345678")]:
            opening: Dict[str, Any] = {"cmd": "open", "cache": cache}
            if code is not None:
                opening["code"] = code
            ok(conn.request(opening)[0])
            lookup = ok(conn.request({"cmd": "get_or_wait", "cache": cache, "key": b64(b"10"), "wait_s": 1.0})[0])
            assert not lookup.get("found") and lookup.get("lease") is True, lookup
            put = ok(conn.request({
                "cmd": "put", "cache": cache, "key": b64(b"10"), "value": b64(b"100"),
                "stamp": lookup["stamp"],
            })[0])
            assert put.get("stored") is True, put
    finally:
        conn.close()
    wait_writes(a, "coded", 1)
    assert figure(a, "plain", "shared_writes") == 0
    assert redis.keys("keepwarm:v1:*:plain:*") == []
    assert len(redis.keys("keepwarm:v1:*:coded:*")) == 1
