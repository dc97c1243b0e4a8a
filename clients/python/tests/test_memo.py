"""@keepwarm.memo against a real `keepwarm serve`, in this interpreter and in
child interpreters, following what the user does."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest

import keepwarm
from conftest import WAIT, Child, Serve

SEED = textwrap.dedent(
    """\
    import keepwarm

    @keepwarm.memo
    def square(x):
        print("Squaring", x)
        return x * x

    print(square(10))
    """
)

# A child that calls square(N) for each line N it reads, and prints the
# result; `info` prints cache_info() as JSON.
DRIVER = textwrap.dedent(
    """\
    import json, sys, time, os
    import keepwarm

    @keepwarm.memo
    def square(x):
        print("Squaring", x, flush=True)
        gate = os.environ.get("GATE")
        if gate:
            while not os.path.exists(gate):
                time.sleep(0.01)
        return x * x

    print("ready", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if line == "info":
            print("info", json.dumps(list(square.cache_info())), flush=True)
        elif line:
            print("result", square(int(line)), flush=True)
    """
)


def test_the_seed_transcript_prints_squaring_once(host, env, tmp_path):
    script = tmp_path / "seed.py"
    script.write_text(SEED)
    rerun = Child("import runpy; runpy.run_path(%r); runpy.run_path(%r)" % (str(script), str(script)), env)
    assert rerun.finish() == 0, rerun.err.all()
    assert rerun.out.all() == ["Squaring 10", "100", "100"]
    again = Child("import runpy; runpy.run_path(%r, run_name='__main__')" % str(script), env)
    assert again.finish() == 0, again.err.all()
    assert again.out.all() == ["100"]
    figures = host.stats("square")
    assert (figures["hits"], figures["misses"], figures["entries"]) == (2, 1, 1)


def test_exec_reruns_keep_the_results(host, env, tmp_path):
    child = Child(
        "src = %r\nfor _ in range(3):\n    exec(compile(src, 'seed.py', 'exec'), {'__name__': '__main__'})"
        % SEED,
        env,
    )
    assert child.finish() == 0, child.err.all()
    assert child.out.all() == ["Squaring 10", "100", "100", "100"]


def test_reset_from_the_cli_is_seen_by_the_next_call(host, env):
    child = Child(DRIVER, env)
    child.out.wait_for("ready")
    child.send("7")
    child.out.wait_for("result 49")
    child.send("7")
    child.out.wait_for("result 49", n=2)
    assert child.out.count("Squaring 7") == 1
    out = host.cli("reset", "square")
    assert out.returncode == 0, out
    child.send("7")
    child.out.wait_for("result 49", n=3)
    assert child.out.count("Squaring 7") == 2
    out = host.cli("reset", "--all")
    assert out.returncode == 0, out
    child.send("7")
    child.out.wait_for("result 49", n=4)
    assert child.out.count("Squaring 7") == 3
    assert child.finish() == 0, child.err.all()


def test_cache_info_agrees_with_keepwarm_stats(host, env):
    child = Child(DRIVER, env)
    for n in ["1", "1", "2", "1", "2", "3"]:
        child.send(n)
    child.send("info")
    line = child.out.wait_for("info ")
    hits, misses, maxsize, currsize = json.loads(line.split(" ", 1)[1])
    assert (hits, misses, currsize) == (3, 3, 3)
    figures = host.stats("square")
    assert (figures["hits"], figures["misses"], figures["capacity"], figures["entries"]) == (
        hits,
        misses,
        maxsize,
        currsize,
    )
    assert child.finish() == 0, child.err.all()


def test_functools_attributes_and_options(here):
    calls = []

    @keepwarm.memo(name="opts", maxsize=50, version=1)
    def f(x, y=0):
        """Adds."""
        calls.append((x, y))
        return x + y

    assert f.__name__ == "f" and f.__doc__ == "Adds." and f.__wrapped__(1, 2) == 3
    calls.clear()
    assert f.cache_parameters() == {"maxsize": 50, "typed": False, "name": "opts"}
    assert f(1, y=2) == 3 and f(1, y=2) == 3
    assert calls == [(1, 2)]
    info = f.cache_info()
    assert info == keepwarm.CacheInfo(1, 1, 50, 1)
    assert here.stats("opts")["capacity"] == 50

    @keepwarm.memo(name="opts", version=2)
    def f2(x, y=0):
        calls.append(("v2", x, y))
        return x + y

    assert f2(1, y=2) == 3
    assert calls == [(1, 2), ("v2", 1, 2)], "a new version never sees the old entries"

    @keepwarm.memo(name="typed", typed=True)
    def t(x):
        calls.append(("t", x))
        return x

    assert t(1) == 1 and t(1.0) == 1.0 and t(1) == 1
    assert calls[-2:] == [("t", 1), ("t", 1.0)]

    f.cache_clear()
    assert here.stats("opts")["entries"] == 0
    assert f(1, y=2) == 3
    assert calls[-1] == (1, 2)


def test_default_name_is_the_qualified_name(here):
    class Geometry:
        @staticmethod
        @keepwarm.memo
        def area(w, h):
            return w * h

    assert Geometry.area(2, 3) == 6
    stats = json.loads(here.cli("stats", "--json").stdout)
    assert any(s["name"].endswith("Geometry.area") for s in stats), stats


def test_unpicklable_arguments_name_the_argument_and_errors_are_not_cached(here):
    calls = []

    @keepwarm.memo(name="picky")
    def g(data, scale=1):
        calls.append(data)
        if data == "boom":
            raise ValueError("boom")
        return len(data) * scale

    with pytest.raises(TypeError, match="argument 'scale'"):
        g("abc", scale=lambda: 1)
    with pytest.raises(TypeError, match="argument 'data'"):
        g(threading.Lock())
    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            g("boom")
    assert calls == ["boom", "boom"], "an exception is never cached"
    assert here.stats("picky")["entries"] == 0


def test_threads_each_get_their_own_correct_answers(here):
    computed = []
    lock = threading.Lock()

    @keepwarm.memo(name="threads")
    def cube(x):
        with lock:
            computed.append(x)
        return x ** 3

    results = {}

    def work(t):
        results[t] = [cube(i % 10) for i in range(200)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for t in range(8):
        assert results[t] == [(i % 10) ** 3 for i in range(200)]
    assert sorted(set(computed)) == list(range(10))
    assert len(computed) == 10, "single flight between threads: each key computed once"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reconnects_and_shares_the_cache(here):
    @keepwarm.memo(name="forked")
    def neg(x):
        return -x

    assert neg(1) == -1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read)
            answers = [neg(1), neg(2), neg(3)]
            os.write(write, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as r:
        assert json.loads(r.read()) == [-1, -2, -3]
    assert os.waitpid(pid, 0)[1] == 0
    assert neg(2) == -2 and neg(1) == -1
    assert here.stats("forked")["entries"] == 3
    # The parent's connection still works after the child's exit.
    assert neg(4) == -4


def test_two_interpreters_compute_a_cold_key_once(host, env, tmp_path):
    gate = tmp_path / "gate"
    a = Child(DRIVER, dict(env, GATE=str(gate)))
    a.send("10")
    a.out.wait_for("Squaring 10")
    b = Child(DRIVER, env)
    b.send("10")
    # b waits once its miss is counted; then a may finish.
    deadline_misses(host, "square", 2)
    gate.write_text("")
    a.out.wait_for("result 100")
    b.out.wait_for("result 100")
    assert b.out.count("Squaring") == 0
    assert a.finish() == 0 and b.finish() == 0
    figures = host.stats("square")
    assert (figures["hits"], figures["misses"]) == (1, 1)


def test_the_waiter_computes_when_the_computing_process_dies(host, env, tmp_path):
    a = Child(DRIVER, dict(env, GATE=str(tmp_path / "never")))
    a.send("10")
    a.out.wait_for("Squaring 10")
    b = Child(DRIVER, env)
    b.send("10")
    deadline_misses(host, "square", 2)
    a.kill()
    b.out.wait_for("result 100")
    assert b.out.count("Squaring 10") == 1
    assert b.finish() == 0, b.err.all()


def deadline_misses(host: Serve, cache: str, n: int) -> None:
    """Waits until the host counted `n` misses of `cache`."""
    import time

    deadline = time.monotonic() + WAIT
    while True:
        out = host.cli("stats", cache, "--json")
        if out.returncode == 0 and json.loads(out.stdout)[0]["misses"] >= n:
            return
        assert time.monotonic() < deadline, out
        time.sleep(0.02)


def test_no_host_the_function_runs_with_one_warning_and_reconnects(runtime, tmp_path):
    sock = runtime / "later.sock"
    env = dict(
        os.environ,
        XDG_RUNTIME_DIR=str(runtime),
        KEEPWARM_SOCKET=str(sock),
        KEEPWARM_RETRY_S="0",
        PYTHONWARNINGS="always",
    )
    child = Child(DRIVER, env)
    for n in ["3", "3", "4"]:
        child.send(n)
    child.out.wait_for("result 16")
    assert child.out.count("Squaring 3") == 1, "an in-process cache while no host answers"
    child.send("info")
    child.out.wait_for("info [1, 2,")
    assert sum("RuntimeWarning" in l for l in child.err.all()) == 1, child.err.all()
    assert "no keepwarm host answers" in "\n".join(child.err.all())

    host = Serve(runtime, sock)
    try:
        child.send("5")
        child.out.wait_for("result 25")
        assert host.stats("square")["entries"] == 1, "reconnected: the value is in the host"
        child.send("5")
        child.out.wait_for("result 25", n=2)
        assert child.out.count("Squaring 5") == 1

        # Gone mid-session: still answers, never raises.
        host.stop()
        child.send("5")
        child.out.wait_for("result 25", n=3)
        child.send("6")
        child.out.wait_for("result 36")
    finally:
        host.stop()
    assert child.finish() == 0, child.err.all()
    assert not any("Traceback" in l for l in child.err.all()), child.err.all()


def test_a_new_host_instance_drops_the_front_tier(runtime):
    sock = runtime / "host.sock"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), KEEPWARM_SOCKET=str(sock), KEEPWARM_RETRY_S="0")
    first = Serve(runtime, sock)
    child = Child(DRIVER, env)
    child.send("3")
    child.out.wait_for("result 9")
    first.stop()
    second = Serve(runtime, sock)
    try:
        child.send("3")
        child.out.wait_for("result 9", n=2)
        assert child.out.count("Squaring 3") == 2, "the new host is empty: computed again"
        child.send("3")
        child.out.wait_for("result 9", n=3)
        assert child.out.count("Squaring 3") == 2
        assert second.stats("square")["entries"] == 1
    finally:
        second.stop()
    assert child.finish() == 0, child.err.all()


def test_discovery_finds_the_one_live_host(runtime, tmp_path):
    host = Serve(runtime, None)  # its default socket: serve.sock in the runtime directory
    try:
        assert host.socket.exists()
        env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
        env.pop("KEEPWARM_SOCKET", None)
        script = tmp_path / "seed.py"
        script.write_text(SEED)
        child = Child("import runpy; runpy.run_path(%r)" % str(script), env)
        assert child.finish() == 0, child.err.all()
        assert child.out.all() == ["Squaring 10", "100"]
        assert host.stats("square")["entries"] == 1

        second = Serve(runtime, runtime / "keepwarm" / "other.sock")
        try:
            child = Child("import runpy; runpy.run_path(%r)" % str(script), env)
            assert child.finish() == 0
            assert child.out.all() == ["Squaring 10", "100"], "two hosts: none chosen"
            assert "choose one with KEEPWARM_SOCKET" in "\n".join(child.err.all())
        finally:
            second.stop()
    finally:
        assert host.stop() == 0


def test_values_are_pickled_exactly(here):
    @keepwarm.memo(name="exact")
    def blob(n):
        return bytes(range(256)) * n, {"n": n, "big": 2 ** 100}, [1.5, None, "é\n"]

    first = blob(3)
    from keepwarm import _memo

    _memo._CACHES["exact"].front.clear()  # the next call asks the host
    assert blob(3) == first
    assert here.stats("exact")["hits"] == 1


def test_a_value_too_large_for_the_protocol_is_kept_locally(here):
    @keepwarm.memo(name="huge")
    def huge(n):
        return b"x" * n

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(huge(2 << 20)) == 2 << 20
    assert any("too large" in str(w.message) for w in caught)
    assert here.stats("huge")["entries"] == 0
    assert len(huge(2 << 20)) == 2 << 20


def test_arguments_too_large_for_a_request_are_computed_and_not_kept(here):
    calls = []

    @keepwarm.memo(name="bigargs")
    def size(data):
        calls.append(1)
        return len(data)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert size(b"y" * (1 << 20)) == 1 << 20
        assert size(b"y" * (1 << 20)) == 1 << 20
    assert len(calls) == 2
    assert any("too many for a request" in str(w.message) for w in caught)
    assert size(b"small") == 5 and size(b"small") == 5
    assert len(calls) == 3, "the host still serves the function's other calls"
