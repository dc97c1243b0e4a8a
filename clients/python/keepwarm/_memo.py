"""``@keepwarm.memo``: the decorator, its in-process front tier, and how a
call goes to the host when the front tier cannot answer."""

from __future__ import annotations

import atexit
import functools
import hashlib
import inspect
import marshal
import os
import pickle
import threading
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    Hashable,
    NamedTuple,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from . import _host
from ._host import HostDown, b64, unb64

#: Pickle protocol of keys: fixed, so that every interpreter (3.9 and later)
#: writes the same key bytes for the same arguments.
KEY_PROTOCOL = 4
#: Pickle protocol of values (readable by every supported interpreter).
VALUE_PROTOCOL = 5
#: Entries kept in the front tier of a cache when ``maxsize`` is not given.
FRONT_ENTRIES = 10_000

class CacheInfo(NamedTuple):
    """As ``functools.lru_cache``'s: the host's figures for the cache (after
    this process's own hits are counted there); ``maxsize`` is the entry
    bound in force on the host. With no host, this process's own figures
    (``maxsize`` as given to the decorator)."""

    hits: int
    misses: int
    maxsize: Optional[int]
    currsize: int


class _Refused(Exception):
    """The host answered a lookup with an error (a key too long for a
    request line, say): the call is computed here and not kept."""

_MISSING = object()


class _KwdMark:
    """Separates positional from keyword arguments in a key (a class, so it
    pickles by name and no argument value can stand for it)."""


def _make_key(args: Tuple[Any, ...], kwds: Dict[str, Any], typed: bool) -> Tuple[Any, ...]:
    # functools._make_key, flat tuple and all; keyword order matters, as there.
    key = args
    if kwds:
        key += (_KwdMark,)
        for item in kwds.items():
            key += item
    if typed:
        key += tuple(type(v) for v in args)
        if kwds:
            key += tuple(type(v) for v in kwds.values())
    return key


class _Cache:
    """The state of one named cache in this process: the front tier (kept
    here, in the module, so a rerun of the script finds it), its stamp, and
    the hits it served that the host has not been told of."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.front: Dict[bytes, Any] = {}
        self.limit = FRONT_ENTRIES
        self.maxsize: Optional[int] = None
        # The words of the epoch page, and this cache's index in them (the
        # stamp the front tier is valid for is at words[index]).
        self.words: Any = None
        self.index = 0
        self.stamp = -1
        self.instance: Optional[int] = None
        self.capacity: Optional[int] = None
        # The identity of the function's code (see _code_id), sent with
        # `open`: a host with a shared tier shares entries under it only.
        self.code: Optional[str] = None
        self.hits = 0
        # Figures while no host answers.
        self.local_hits = 0
        self.local_misses = 0

    def take_hits(self) -> int:
        """The hits to report to the host, counted as reported (a hit that
        lands meanwhile waits for the next report)."""
        with self.lock:
            n, self.hits = self.hits, 0
        return n

    def after_fork(self) -> None:
        # The parent reports its own hits.
        self.hits = 0
        self.lock = threading.Lock()

    def remember(self, key: bytes, value: Any, stamp: Optional[int]) -> None:
        """Keeps ``value`` in the front tier when the host's answer carried
        the stamp the epoch page shows now (no reset since the lookup)."""
        words = self.words
        if words is None:
            return
        with self.lock:
            now = words[self.index]
            if now != self.stamp:
                self.front.clear()
                self.stamp = now
            if stamp != now:
                return
            front = self.front
            if key not in front and len(front) >= self.limit:
                del front[next(iter(front))]
            front[key] = value

    def keep_locally(self, key: bytes, value: Any) -> None:
        """Keeps ``value`` while no host answers."""
        with self.lock:
            front = self.front
            if key not in front and len(front) >= self.limit:
                del front[next(iter(front))]
            front[key] = value

    def open_request(self) -> Dict[str, Any]:
        r: Dict[str, Any] = {"cmd": "open", "cache": self.name}
        if self.maxsize is not None:
            r["max_entries"] = self.maxsize
        if self.code is not None:
            r["code"] = self.code
        return r

    def opened(self, result: Dict[str, Any]) -> None:
        """Takes in the host's answer to ``open``."""
        changed, page = _HOST.adopt(result.get("instance"), result.get("page"))
        with self.lock:
            if changed or result.get("instance") != self.instance:
                self.front.clear()
            self.instance = result.get("instance")
            self.capacity = result.get("capacity")
            slot = result.get("slot")
            if page is not None and slot is not None:
                self.index = 8 + slot
                self.words = page.words
                self.stamp = page.words[self.index]
            else:
                # No page (a `keepwarm run` host) or no slot: every call asks.
                self.words = None
                self.front.clear()


_HOST = _host.Host()
_CACHES: Dict[str, _Cache] = {}
_CACHES_LOCK = threading.Lock()


def _cache(name: str) -> _Cache:
    with _CACHES_LOCK:
        c = _CACHES.get(name)
        if c is None:
            c = _CACHES[name] = _Cache(name)
        return c


def _after_fork_in_child() -> None:
    _HOST.after_fork()
    for c in list(_CACHES.values()):
        c.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn_down(name: str) -> None:
    if not _HOST.warned:
        _HOST.warned = True
        warnings.warn(
            "keepwarm: %s; %s() runs with an in-process cache until a host answers "
            "(tried again at most every %g s)" % (_HOST.problem, name, _host.RETRY_S),
            RuntimeWarning,
            stacklevel=5,
        )


def _flush_at_exit() -> None:
    # Tell the host of the hits the front tiers served, so `keepwarm stats`
    # counts them after this process is gone (best effort, never raises).
    if _HOST.down_since is not None:
        return
    requests = [
        {"cmd": "cache_info", "cache": c.name, "hits": c.take_hits()}
        for c in list(_CACHES.values())
        if c.hits and c.instance is not None
    ]
    if requests:
        try:
            _HOST.request(*requests)
        except Exception:
            pass


atexit.register(_flush_at_exit)


def _unpicklable(func: Callable[..., Any], args: Tuple[Any, ...], kwds: Dict[str, Any], error: Exception) -> TypeError:
    """The TypeError for arguments that do not pickle, naming the first
    one that does not."""
    try:
        names = [
            p.name
            for p in inspect.signature(func).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        names = []
    culprit = None
    for i, a in enumerate(args):
        try:
            pickle.dumps(a, KEY_PROTOCOL)
        except Exception as e:
            culprit = (names[i] if i < len(names) else "#%d" % (i + 1), a, e)
            break
    else:
        for k, a in kwds.items():
            try:
                pickle.dumps(a, KEY_PROTOCOL)
            except Exception as e:
                culprit = (k, a, e)
                break
    if culprit is None:
        return TypeError(
            "%s(): the arguments cannot be pickled (%s); keepwarm.memo keys results by "
            "the pickled arguments" % (func.__qualname__, error)
        )
    name, value, why = culprit
    return TypeError(
        "%s(): argument %r (a %s) cannot be pickled (%s); keepwarm.memo keys results by "
        "the pickled arguments: pass values that pickle (numbers, strings, tuples, …), "
        "or leave this function undecorated" % (func.__qualname__, name, type(value).__name__, why)
    )


R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Memoized(Protocol[R_co]):
    """What ``@keepwarm.memo`` returns, for type checkers: the function,
    with ``lru_cache``'s methods."""

    @property
    def __wrapped__(self) -> Callable[..., R_co]: ...  # pragma: no cover

    def __call__(self, *args: Any, **kwargs: Any) -> R_co: ...  # pragma: no cover

    def cache_info(self) -> CacheInfo: ...  # pragma: no cover

    def cache_clear(self) -> None: ...  # pragma: no cover

    def cache_parameters(self) -> Dict[str, Any]: ...  # pragma: no cover


def _code_id(func: Callable[..., Any]) -> str:
    """The identity of ``func``'s code, as 16 hex digits: a hash of its
    source text (decorator line included), else of its compiled code. A host
    started with ``--shared`` shares entries between machines only under it,
    so an edited function never reads another's results there (the local
    caches keep theirs across edits, as always)."""
    try:
        text = inspect.getsource(func).encode("utf-8")
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        text = marshal.dumps(code) if code is not None else repr(func).encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=8, person=b"keepwarm-py-code").digest()
    return "%016x" % (int.from_bytes(digest, "little") | 1)


class _Memo:
    """Builds the wrapper of one decorated function."""

    def __init__(self, func: Callable[..., Any], name: Optional[str], maxsize: Optional[int], version: Hashable, typed: bool) -> None:
        self.func = func
        self.typed = typed
        self.cache = _cache(name or func.__qualname__)
        if maxsize is not None:
            self.cache.maxsize = maxsize
            self.cache.limit = maxsize
        code = _code_id(func)
        with self.cache.lock:
            if self.cache.code != code:
                # Open again, under the new identity.
                self.cache.code = code
                self.cache.instance = None
        # The version is part of every key: entries of another version are
        # never found.
        self.prefix = repr(version).encode("utf-8") + b"\n"

    def slow(self, key: bytes, args: Tuple[Any, ...], kwds: Dict[str, Any]) -> Any:
        """A call the front tier could not answer: ask the host (one round
        trip), compute on a miss and put the value there."""
        c = self.cache
        func = self.func
        if len(key) * 4 // 3 + len(c.name) * 6 + 200 > _host.MAX_REQUEST_BYTES:
            warnings.warn(
                "keepwarm: the arguments of this %s() call pickle to %d bytes, too many for a "
                "request to the host (about 786,000 at most); computed, not kept"
                % (func.__qualname__, len(key)),
                RuntimeWarning,
                stacklevel=3,
            )
            return func(*args, **kwds)
        try:
            lookup = {
                "cmd": "get_or_wait",
                "cache": c.name,
                "key": b64(key),
                "hits": c.take_hits(),
                "wait_s": _host.WAIT_S,
            }
            if c.instance is None or c.instance != _HOST.instance:
                opened, answer = _HOST.request(c.open_request(), lookup)
                if opened.get("ok"):
                    c.opened(opened["result"])
            else:
                (answer,) = _HOST.request(lookup)
            if not answer.get("ok"):
                raise _Refused((answer.get("error") or {}).get("message", "no reason given"))
            result = answer["result"]
            if result.get("instance") != c.instance:
                # Another host answered on this path (restarted): start over.
                (opened,) = _HOST.request(c.open_request())
                if opened.get("ok"):
                    c.opened(opened["result"])
        except HostDown:
            return self.without_host(key, args, kwds)
        except _Refused as e:
            warnings.warn(
                "keepwarm: the host refused the lookup of a %s() call (%s); computed, not kept"
                % (func.__qualname__, e),
                RuntimeWarning,
                stacklevel=3,
            )
            return func(*args, **kwds)
        stamp = result.get("stamp")
        if result.get("found"):
            try:
                value = pickle.loads(unb64(result["value"]))
            except Exception:
                # A value this interpreter cannot read (a class it lacks):
                # computed here instead.
                value = _MISSING
            if value is not _MISSING:
                c.remember(key, value, stamp)
                return value
        leased = bool(result.get("lease"))
        try:
            value = func(*args, **kwds)
        except BaseException:
            if leased:
                try:
                    _HOST.request({"cmd": "release", "cache": c.name, "key": b64(key)})
                except HostDown:
                    pass
            raise
        self.put(key, value, stamp, leased)
        return value

    def put(self, key: bytes, value: Any, stamp: Optional[int], leased: bool) -> None:
        c = self.cache
        request: Dict[str, Any] = {"cmd": "put", "cache": c.name, "key": b64(key)}
        try:
            request["value"] = b64(pickle.dumps(value, VALUE_PROTOCOL))
        except Exception as e:
            warnings.warn(
                "keepwarm: the result of %s() cannot be pickled (%s); it is not kept"
                % (self.func.__qualname__, e),
                RuntimeWarning,
                stacklevel=4,
            )
            request = {"cmd": "release", "cache": c.name, "key": b64(key)}
        if stamp is not None and "value" in request:
            request["stamp"] = stamp
        if len(request.get("key", b"")) + len(request.get("value", b"")) + 200 + len(c.name) * 6 > _host.MAX_REQUEST_BYTES:
            warnings.warn(
                "keepwarm: the result of %s() is too large for the host (more than %d bytes "
                "pickled, in base64); it is kept in this process only"
                % (self.func.__qualname__, _host.MAX_REQUEST_BYTES * 3 // 4),
                RuntimeWarning,
                stacklevel=4,
            )
            request = {"cmd": "release", "cache": c.name, "key": b64(key)}
            c.remember(key, value, stamp)
        try:
            if request["cmd"] == "put" or leased:
                _HOST.request(request)
        except HostDown:
            c.keep_locally(key, value)
            return
        if request["cmd"] == "put":
            c.remember(key, value, stamp)

    def without_host(self, key: bytes, args: Tuple[Any, ...], kwds: Dict[str, Any]) -> Any:
        """No host answers: the front tier is an ordinary in-process cache
        until one does."""
        c = self.cache
        _warn_down(self.func.__qualname__)
        value = c.front.get(key, _MISSING)
        if value is not _MISSING:
            c.local_hits += 1
            return value
        c.local_misses += 1
        value = self.func(*args, **kwds)
        c.keep_locally(key, value)
        return value

    def cache_info(self) -> CacheInfo:
        c = self.cache
        try:
            requests = []
            if c.instance is None or c.instance != _HOST.instance:
                requests.append(c.open_request())
            requests.append({"cmd": "cache_info", "cache": c.name, "hits": c.take_hits()})
            answers = _HOST.request(*requests)
            if len(answers) == 2 and answers[0].get("ok"):
                c.opened(answers[0]["result"])
            s = answers[-1]
            if not s.get("ok"):
                raise HostDown("the host refused cache_info: %s" % s.get("error"))
            s = s["result"]
            return CacheInfo(s["hits"], s["misses"], s["capacity"], s["entries"])
        except HostDown:
            return CacheInfo(c.local_hits, c.local_misses, c.maxsize, len(c.front))

    def cache_clear(self) -> None:
        c = self.cache
        with c.lock:
            c.front.clear()
        c.local_hits = c.local_misses = 0
        try:
            requests = [c.open_request(), {"cmd": "reset", "cache": c.name}]
            answers = _HOST.request(*requests)
            if answers[0].get("ok"):
                c.opened(answers[0]["result"])
        except HostDown:
            pass

    def wrap(self) -> Callable[..., Any]:
        func = self.func
        cache = self.cache
        prefix = self.prefix
        typed = self.typed
        dumps = pickle.dumps
        slow = self.slow

        def wrapper(*args: Any, **kwds: Any) -> Any:
            try:
                if kwds or typed:
                    key = prefix + dumps(_make_key(args, kwds, typed), KEY_PROTOCOL)
                else:
                    key = prefix + dumps(args, KEY_PROTOCOL)
            except Exception as e:
                raise _unpicklable(func, args, kwds, e) from None
            value = cache.front.get(key, _MISSING)
            if value is not _MISSING:
                words = cache.words
                # One 8-byte read: no reset since the copy was taken.
                if words is not None and words[cache.index] == cache.stamp:
                    cache.hits += 1
                    return value
            return slow(key, args, kwds)

        functools.update_wrapper(wrapper, func)
        wrapper.cache_info = self.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = self.cache_clear  # type: ignore[attr-defined]
        wrapper.cache_parameters = lambda: {  # type: ignore[attr-defined]
            "maxsize": cache.maxsize,
            "typed": typed,
            "name": cache.name,
        }
        return wrapper


@overload
def memo(func: Callable[..., R]) -> Memoized[R]: ...


@overload
def memo(
    func: Optional[int] = None,
    *,
    name: Optional[str] = None,
    maxsize: Optional[int] = None,
    version: Hashable = 0,
    typed: bool = False,
) -> Callable[[Callable[..., R]], Memoized[R]]: ...


def memo(
    func: Union[Callable[..., Any], int, None] = None,
    *,
    name: Optional[str] = None,
    maxsize: Optional[int] = None,
    version: Hashable = 0,
    typed: bool = False,
) -> Any:
    """Memoizes a function in the keepwarm host's cache named after it.

    ``@keepwarm.memo`` or ``@keepwarm.memo(name=…, maxsize=…, version=…,
    typed=…)``; like ``functools.lru_cache`` (``cache_info()``,
    ``cache_clear()``, ``__wrapped__``), except that the results stay in the
    host when the script is run again. See the package's README.
    """
    if isinstance(func, int) and not isinstance(func, bool):
        # @keepwarm.memo(128), as lru_cache(128).
        maxsize, func = func, None
    if maxsize is not None and maxsize < 1:
        raise ValueError("maxsize must be at least 1 (or None for the host's bound)")

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise TypeError("keepwarm.memo decorates a function, not %r" % (f,))
        return _Memo(f, name, maxsize, version, typed).wrap()

    if func is None:
        return decorate
    if not callable(func):
        raise TypeError("keepwarm.memo decorates a function, or takes maxsize; got %r" % (func,))
    return decorate(func)
