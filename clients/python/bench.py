"""Benchmark of @keepwarm.memo against the alternatives, in one run.

    make bench            # builds the release host, makes target/bench-venv, runs this
    python bench.py [--keepwarm PATH] [--quick]

Rows (each a median over repeated batches, with the min–max of the batches):

- functools.lru_cache hit: the in-process floor (lost on every rerun);
- keepwarm warm hit: the front tier, checked against the epoch page;
- keepwarm first hit in a new interpreter: connect + open + lookup (one
  round trip, pipelined) + mapping the page + unpickling, timed inside a
  fresh interpreter whose import is already done;
- keepwarm miss + put: a cold key, computed (x * x) and put (two round trips);
- a bare round trip on an open connection (a `get` of a missing key), the
  unit the first hit is measured in;
- diskcache's memoize hit and joblib.Memory hit (installed from PyPI into the
  bench's venv; skipped with a note when missing);
- base64 in the JSON line: encode + decode + json of a put line, per payload
  size, against the payload's plain copy.
"""

from __future__ import annotations

import argparse
import binascii
import functools
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]


def batches(call: Callable[[], object], n: int, repeat: int) -> List[float]:
    """Per-call seconds of `repeat` batches of `n` calls."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            call()
        out.append((time.perf_counter() - start) / n)
    return out


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    if us < 10:
        return "%.2f µs" % us
    if us < 1000:
        return "%.0f µs" % us
    return "%.2f ms" % (us / 1000)


class Row:
    def __init__(self, name: str, samples: List[float]) -> None:
        self.name = name
        self.samples = samples
        self.median = statistics.median(samples)

    def line(self, floor: float) -> str:
        return "%-44s %10s  (%s–%s)  %8.1f×" % (
            self.name,
            fmt(self.median),
            fmt(min(self.samples)),
            fmt(max(self.samples)),
            self.median / floor,
        )


def start_host(binary: str, runtime: Path) -> Tuple[subprocess.Popen, Path]:
    sock = runtime / "bench.sock"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    proc = subprocess.Popen(
        [binary, "serve", "--socket", str(sock)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving caches" not in line:
        raise SystemExit("keepwarm serve did not start: %r" % line)
    return proc, sock


def first_hit_in_new_interpreter(env: dict, runs: int) -> List[float]:
    body = (
        "import keepwarm, time\n"
        "@keepwarm.memo\n"
        "def square(x):\n"
        "    return x * x\n"
        "t = time.perf_counter(); v = square(10); d = time.perf_counter() - t\n"
        "assert v == 100\n"
        "print(d)\n"
    )
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, check=True)
        out.append(float(r.stdout.strip()))
    return out


def bare_round_trips(sock: Path, n: int, repeat: int) -> List[float]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    f = s.makefile("rwb")
    line = b'{"v":1,"cmd":"get","cache":"bench_rt","key":"AA=="}\n'

    def one() -> None:
        f.write(line)
        f.flush()
        f.readline()

    one()
    try:
        return batches(one, n, repeat)
    finally:
        s.close()


def framing_costs(sizes: List[int]) -> List[Tuple[int, float, float]]:
    """Client-side cost of carrying a value of each size both ways: writing
    a put line and reading a found answer. (size, seconds with base64 in the
    JSON line — what the protocol does —, seconds with a length-prefixed
    frame — a JSON header line, then the raw bytes — the alternative.)"""
    from keepwarm._host import b64, encode, unb64

    out = []
    for size in sizes:
        payload = os.urandom(size)
        n = max(10, 1_000_000 // max(size, 1))
        answer = b'{"v":1,"ok":true,"result":{"found":true,"stamp":12345678901234567,"value":"%s"}}' % b64(payload)

        def base64_line() -> None:
            line = encode({"cmd": "put", "cache": "c", "key": b64(b"k"), "value": b64(payload), "v": 1})
            assert line
            back = unb64(json.loads(answer)["result"]["value"])
            assert len(back) == size

        header = json.dumps({"v": 1, "ok": True, "result": {"found": True, "stamp": 12345678901234567, "bytes": size}}).encode() + b"\n"
        framed_answer = header + payload

        def length_prefixed() -> None:
            line = json.dumps({"cmd": "put", "cache": "c", "key_bytes": 1, "value_bytes": size, "v": 1}).encode()
            frame = line + b"\n" + b"k" + payload
            assert frame
            end = framed_answer.index(b"\n")
            meta = json.loads(framed_answer[:end])
            back = framed_answer[end + 1 : end + 1 + meta["result"]["bytes"]]
            assert len(back) == size

        b = statistics.median(batches(base64_line, n, 5))
        f = statistics.median(batches(length_prefixed, n, 5))
        out.append((size, b, f))
    return out


def new_connection_round_trips(sock: Path, runs: int) -> List[float]:
    """A new connection and one `get`: the floor of a first hit."""
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.sendall(b'{"v":1,"cmd":"get","cache":"bench_rt","key":"AA=="}\n')
        f = s.makefile("rb")
        f.readline()
        out.append(time.perf_counter() - start)
        f.close()
        s.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keepwarm", default=os.environ.get("KEEPWARM_BIN") or str(ROOT / "target" / "release" / "keepwarm"))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeat = 7 if args.quick else 21
    n = 20_000 if args.quick else 100_000

    runtime = Path(tempfile.mkdtemp(prefix="kw-bench-"))
    os.chmod(runtime, 0o700)
    proc, sock = start_host(args.keepwarm, runtime)
    os.environ["KEEPWARM_SOCKET"] = str(sock)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import keepwarm

    rows: List[Row] = []
    notes: List[str] = []
    try:
        @functools.lru_cache(maxsize=None)
        def lru_square(x: int) -> int:
            return x * x

        lru_square(10)
        rows.append(Row("functools.lru_cache hit", batches(lambda: lru_square(10), n, repeat)))

        @keepwarm.memo
        def square(x: int) -> int:
            return x * x

        square(10)
        rows.append(Row("keepwarm warm hit (front tier + epoch page)", batches(lambda: square(10), n, repeat)))

        child_env = dict(os.environ)
        rows.append(Row("keepwarm first hit in a new interpreter", first_hit_in_new_interpreter(child_env, 11 if args.quick else 21)))

        counter = iter(range(10**12, 10**13))
        rows.append(Row("keepwarm miss + put (2 round trips)", batches(lambda: square(next(counter)), 200, repeat)))

        rows.append(Row("bare round trip (get on an open connection)", bare_round_trips(sock, 500, repeat)))
        rows.append(Row("bare new connection + one get", new_connection_round_trips(sock, 21 if args.quick else 51)))

        try:
            import diskcache  # type: ignore[import-not-found]

            d = tempfile.mkdtemp(prefix="kw-diskcache-")
            dc = diskcache.Cache(d)

            @dc.memoize()
            def dc_square(x: int) -> int:
                return x * x

            dc_square(10)
            rows.append(Row("diskcache memoize hit", batches(lambda: dc_square(10), n // 20, repeat)))
            dc.close()
            shutil.rmtree(d, ignore_errors=True)
        except ImportError:
            notes.append("diskcache is not installed (make bench installs it in target/bench-venv)")
        try:
            import joblib  # type: ignore[import-not-found]

            d = tempfile.mkdtemp(prefix="kw-joblib-")
            memory = joblib.Memory(d, verbose=0)

            @memory.cache
            def jl_square(x: int) -> int:
                return x * x

            jl_square(10)
            rows.append(Row("joblib.Memory hit", batches(lambda: jl_square(10), n // 200, repeat)))
            shutil.rmtree(d, ignore_errors=True)
        except ImportError:
            notes.append("joblib is not installed (make bench installs it in target/bench-venv)")

        costs = framing_costs([64, 1024, 16 << 10, 64 << 10, 512 << 10])
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)

    floor = rows[0].median
    print("keepwarm Python client bench · Python %s · host %s" % (sys.version.split()[0], args.keepwarm))
    print("%-44s %10s  %-22s %9s" % ("row", "median", "(min–max of batches)", "÷ lru"))
    for r in rows:
        print(r.line(floor))
    by = {r.name: r.median for r in rows}
    rt = by["bare round trip (get on an open connection)"]
    warm = by["keepwarm warm hit (front tier + epoch page)"]
    print()
    first = by["keepwarm first hit in a new interpreter"]
    print("first hit in a new interpreter = %.2f round trips on an open connection, %.2f× a new connection + one get"
          % (first / rt, first / by["bare new connection + one get"]))
    print("miss + put = %.2f round trips" % (by["keepwarm miss + put (2 round trips)"] / rt))
    for other in ("diskcache memoize hit", "joblib.Memory hit"):
        if other in by:
            print("%s / keepwarm warm hit = %.0f×" % (other, by[other] / warm))
    print()
    print("carrying a value both ways in the client (write a put line + read a found answer):")
    print("  %10s  %22s  %22s" % ("value", "base64 in the JSON line", "length-prefixed frame"))
    for size, b, f in costs:
        print("  %8d B  %10s (%5.0f%% of a RT)  %10s (%5.0f%% of a RT)"
              % (size, fmt(b), 100 * b / rt, fmt(f), 100 * f / rt))
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
