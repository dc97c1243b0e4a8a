"""The host side of the client: finding the host, one connection per thread,
the protocol's entry commands, and the epoch page mapped read-only.

Nothing here raises into the user's code: every failure to reach the host
is a :class:`HostDown`, which the memo layer turns into "run the function
with the in-process cache, warn once".
"""

from __future__ import annotations

import binascii
import json
import mmap
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

PROTOCOL_VERSION = 1
#: Longest request line a host accepts (docs/PROTOCOL.md).
MAX_REQUEST_BYTES = 1 << 20
#: Seconds a ``get_or_wait`` waits for another process's value.
WAIT_S = 60.0
#: Seconds between two attempts to reach a host that was not there
#: (``KEEPWARM_RETRY_S`` overrides it).
RETRY_S = float(os.environ.get("KEEPWARM_RETRY_S") or 1.0)

PAGE_MAGIC = b"KWEPOCH1"
PAGE_HEADER = 64
PAGE_SLOTS = 4096
PAGE_BYTES = PAGE_HEADER + 8 * PAGE_SLOTS


class HostDown(Exception):
    """No host answers (none running, several and none chosen, or it went
    away mid-request)."""


def runtime_dir() -> str:
    """The directory where hosts put their sockets, as the CLI finds it:
    ``$XDG_RUNTIME_DIR/keepwarm``, else ``$TMPDIR/keepwarm-$UID``
    (``/tmp`` when ``TMPDIR`` is unset)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "keepwarm")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, "keepwarm-%d" % os.getuid())


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def discover() -> str:
    """The socket of the host to use: ``KEEPWARM_SOCKET``, else the one live
    ``*.sock`` in :func:`runtime_dir`. Raises :class:`HostDown` with a
    sentence that says what to do."""
    named = os.environ.get("KEEPWARM_SOCKET")
    if named:
        return named
    directory = runtime_dir()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".sock"))
    except OSError:
        names = []
    if len(names) == 1:
        # One candidate: the connection itself tells whether it answers (a
        # probe first would cost a connection and a host thread).
        return os.path.join(directory, names[0])
    live = [os.path.join(directory, n) for n in names if _answers(os.path.join(directory, n))]
    if len(live) == 1:
        return live[0]
    if not live:
        raise HostDown(
            "no keepwarm host is running (no live socket in %s); start one with "
            "`keepwarm serve &`, or set KEEPWARM_SOCKET" % directory
        )
    raise HostDown(
        "%d keepwarm hosts are running (%s); choose one with KEEPWARM_SOCKET"
        % (len(live), ", ".join(live))
    )


def b64(data: bytes) -> bytes:
    """``data`` in base64 (standard alphabet, padded), as the bytes of the
    JSON string's content: base64 never needs escaping in JSON."""
    return binascii.b2a_base64(data, newline=False)


def encode(request: Dict[str, Any]) -> bytes:
    """One request line (without its newline). Byte values are base64 text
    (:func:`b64`) written as they are; the rest goes through ``json`` —
    scanning a large base64 string for characters to escape cost more
    than encoding it."""
    parts = []
    for k, v in request.items():
        if isinstance(v, bytes):
            parts.append(b'"%s":"%s"' % (k.encode("ascii"), v))
        else:
            parts.append(b'"%s":%s' % (k.encode("ascii"), json.dumps(v).encode("ascii")))
    return b"{" + b",".join(parts) + b"}"


def unb64(text: str) -> bytes:
    return binascii.a2b_base64(text)


class Connection:
    """One connection to the host: a request per line, an answer per line.
    Belongs to one thread of one process."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A get_or_wait may wait WAIT_S for another process's value.
            sock.settimeout(WAIT_S + 30.0)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise HostDown("no keepwarm host answers at %s (%s)" % (path, e)) from None
        self.sock = sock
        self.reader = sock.makefile("rb")
        #: Whether a request was answered on it already.
        self.used = False

    def request(self, *requests: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Sends every request at once (one write), then reads their answers:
        several requests cost one round trip."""
        lines = []
        for r in requests:
            r["v"] = PROTOCOL_VERSION
            lines.append(encode(r))
        try:
            self.sock.sendall(b"\n".join(lines) + b"\n")
            answers = []
            for _ in requests:
                line = self.reader.readline()
                if not line:
                    raise HostDown("the keepwarm host closed the connection")
                answers.append(json.loads(line))
            return answers
        except HostDown:
            self.close()
            raise
        except (OSError, ValueError) as e:
            self.close()
            raise HostDown("the keepwarm host went away (%s)" % e) from None

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class Page:
    """The host's epoch page, mapped read-only: one 8-byte stamp per cache,
    changed by every reset (docs/PROTOCOL.md, "The epoch page")."""

    def __init__(self, path: str, instance: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        try:
            self.map = mmap.mmap(fd, PAGE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        if self.map[:8] != PAGE_MAGIC:
            raise HostDown("%s is not a keepwarm epoch page" % path)
        # Indexed by 8-byte words: the stamp of slot i is words[8 + i].
        self.words = memoryview(self.map).cast("Q")
        if self.words[2] != instance:
            raise HostDown("%s belongs to another host instance" % path)
        self.instance = instance


class Host:
    """The host this process talks to: its socket, its instance, its epoch
    page, and a connection per thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Optional[str] = None
        self.instance: Optional[int] = None
        self.page: Optional[Page] = None
        self.local = threading.local()
        self.down_since: Optional[float] = None
        self.last_attempt = 0.0
        self.warned = False
        self.problem = ""

    def after_fork(self) -> None:
        # The parent's connections are the parent's: never write to them.
        # (And a lock another thread of the parent held stays held here.)
        self.local = threading.local()
        self.lock = threading.Lock()

    def connection(self, retry_now: bool = False) -> Connection:
        """This thread's connection (made on first use, again after a fork
        or a failure; while the host is down, at most once per
        :data:`RETRY_S`). Raises :class:`HostDown`."""
        conn: Optional[Connection] = getattr(self.local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn
        if (
            not retry_now
            and self.down_since is not None
            and time.monotonic() - self.last_attempt < RETRY_S
        ):
            raise HostDown(self.problem)
        self.last_attempt = time.monotonic()
        try:
            path = self.path if (self.path and self.down_since is None) else discover()
            conn = Connection(path)
        except HostDown as e:
            self.went_down(str(e))
            raise
        self.path = path
        self.local.conn = conn
        if self.down_since is not None:
            self.came_back()
        return conn

    def request(self, *requests: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The answers to ``requests`` (one round trip). A connection that
        served before and fails now (the host closed it after a silence, or
        restarted) is replaced once before the host counts as down."""
        for attempt in (0, 1):
            conn = self.connection(retry_now=attempt == 1)
            try:
                answers = conn.request(*requests)
                conn.used = True
                return answers
            except HostDown as e:
                self.local.conn = None
                if attempt == 1 or not conn.used:
                    self.went_down(str(e))
                    raise
        raise AssertionError("unreachable")

    def went_down(self, problem: str) -> None:
        self.problem = problem
        if self.down_since is None:
            self.down_since = time.monotonic()
            # Rediscover next time: another host may come up elsewhere.
            self.path = None

    def came_back(self) -> None:
        self.down_since = None
        self.warned = False

    def adopt(self, instance: Optional[int], page_path: Optional[str]) -> Tuple[bool, Optional[Page]]:
        """Records the instance an ``open`` answered; returns whether it is a
        new one, and the page to check copies against (None: no page, every
        call asks the host)."""
        with self.lock:
            changed = instance != self.instance
            if changed:
                self.instance = instance
                self.page = None
                if instance is not None and page_path:
                    try:
                        self.page = Page(page_path, instance)
                    except (OSError, ValueError, HostDown):
                        self.page = None
            return changed, self.page
