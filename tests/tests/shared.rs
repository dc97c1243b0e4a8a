//! Issue 17, the shared tier (`--shared redis://HOST:PORT[/DB]`): hosts
//! running the same build share entries through a real Redis server,
//! builds whose memoized code changed never see them, garbage planted in
//! Redis is refused and never served, and a Redis server that is
//! unreachable, killed or stalled never stops a call.
//!
//! Every test starts its own `redis-server` ([`RedisServer`], the Debian
//! package) on a free port and its own hosts, so the tests run in
//! parallel. They synchronize on the host's figures (`shared_writes`,
//! `status`'s `shared.state`) and lines, never on sleeps, except where a
//! duration is the point (a 2 s stall).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepwarm_tests::{
    built_library, eventually, keepwarm_bin, Connection, HostProcess, RedisServer, Scratch, WAIT,
};
use serde_json::{json, Value};

/// Every shared entry of the cache `square` (any plugin, code and shape).
const SQUARE_KEYS: &str = "keepwarm:v1:*:square:*";
/// Every shared entry of the cache `fib`.
const FIB_KEYS: &str = "keepwarm:v1:*:fib:*";
/// The header every shared value begins with, and its length.
const MAGIC: &[u8] = b"KWSH";
const HEADER_LEN: usize = 48;

/// A host on `lib` with `--shared` on `redis`, loaded and connected: a
/// call made before the first connection would not ask Redis.
fn shared_host(lib: &Path, redis: &RedisServer) -> HostProcess {
    let host = HostProcess::start(lib, &["--shared", &redis.url()]);
    host.wait_for("generation 1 loaded");
    wait_connected(&host);
    host
}

/// A `keepwarm serve --shared` on `redis`, serving and connected.
fn shared_serve(redis: &RedisServer) -> HostProcess {
    let args: Vec<OsString> = vec!["serve".into(), "--shared".into(), redis.url().into()];
    let host = HostProcess::spawn(&args, None, &[]);
    host.wait_for("serving caches (no plugin)");
    wait_connected(&host);
    host
}

fn wait_connected(host: &HostProcess) {
    eventually("status says the shared tier is connected", || {
        host.status()["shared"]["state"] == "connected"
    });
}

/// One integer figure of one cache (`keepwarm stats --json`).
fn figure(host: &HostProcess, cache: &str, field: &str) -> u64 {
    let stats = host.stats();
    let figures = stats
        .get(cache)
        .unwrap_or_else(|| panic!("no cache {cache} in stats: {stats:?}"));
    figures[field]
        .as_u64()
        .unwrap_or_else(|| panic!("stats of {cache} has no integer {field}: {figures}"))
}

/// Waits until the host's writer stored at least `n` entries of `cache` in
/// Redis.
fn wait_writes(host: &HostProcess, cache: &str, n: u64) {
    eventually(
        &format!("{n} entries of {cache} are written to Redis (shared_writes)"),
        || figure(host, cache, "shared_writes") >= n,
    );
}

/// `square(x)` answers `x * x` (over `keepwarm call`).
fn square_is(host: &HostProcess, x: u64, expected: u64) {
    assert_eq!(
        host.call("square", &[&x.to_string()]),
        json!(expected),
        "square({x})"
    );
}

/// The segments of a shared key, `{prefix}:v1:{plugin}:{cache}:{code}:{shape}:`
/// then the entry's key bytes (which may hold `:` themselves).
fn segments(key: &[u8]) -> Vec<&[u8]> {
    let parts: Vec<&[u8]> = key.splitn(7, |&b| b == b':').collect();
    assert_eq!(
        parts.len(),
        7,
        "not a shared key: {}",
        String::from_utf8_lossy(key)
    );
    parts
}

/// The `{code}` segment of a shared key, checked to be 16 hex digits.
fn code_of(key: &[u8]) -> String {
    let code = String::from_utf8_lossy(segments(key)[4]).into_owned();
    assert!(
        code.len() == 16 && code.bytes().all(|b| b.is_ascii_hexdigit()),
        "the code of {} is not 16 hex digits",
        String::from_utf8_lossy(key)
    );
    code
}

/// A value as a message shows it: its length and first bytes.
fn brief(value: &[u8]) -> String {
    format!(
        "{} bytes: {:?}…",
        value.len(),
        String::from_utf8_lossy(&value[..value.len().min(16)])
    )
}

#[test]
fn a_second_host_answers_the_first_hosts_entries_without_computing() {
    let redis = RedisServer::start();
    let lib = built_library("example-plugin");
    let a = shared_host(&lib, &redis);
    for x in 1..=40 {
        square_is(&a, x, x * x);
    }
    wait_writes(&a, "square", 40);
    let shared = &a.status()["shared"];
    assert_eq!(shared["url"], redis.url(), "{shared}");
    assert_eq!(shared["prefix"], "keepwarm", "{shared}");
    assert_eq!(shared["state"], "connected", "{shared}");

    // In Redis: one key per entry, under the plugin's name, each value
    // behind its header.
    let plugin = a.status()["plugin"]
        .as_str()
        .expect("status names the plugin")
        .to_owned();
    let keys = redis.keys(SQUARE_KEYS);
    assert_eq!(
        keys.len(),
        40,
        "{:?}",
        keys.iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>()
    );
    let expected_start = format!("keepwarm:v1:{plugin}:square:");
    for key in &keys {
        let text = String::from_utf8_lossy(key);
        assert!(
            key.starts_with(expected_start.as_bytes()),
            "{text} does not begin with {expected_start}"
        );
        code_of(key);
        let shape = segments(key)[5];
        assert!(
            shape.len() == 16 && shape.iter().all(|b| b.is_ascii_hexdigit()),
            "the shape of {text} is not 16 hex digits"
        );
        let value = redis.get(key).expect("the key has a value");
        assert!(
            value.starts_with(MAGIC) && value.len() > HEADER_LEN,
            "{text}: {}",
            brief(&value)
        );
    }

    // A fresh host, configured by the environment instead of the flag.
    let args: Vec<OsString> = vec!["run".into(), lib.clone().into(), "--no-repl".into()];
    let url = redis.url();
    let b = HostProcess::spawn(&args, None, &[("KEEPWARM_SHARED", Path::new(&url))]);
    b.wait_for("generation 1 loaded");
    wait_connected(&b);
    for x in 1..=40 {
        square_is(&b, x, x * x);
    }
    assert_eq!(
        b.count("Squaring"),
        0,
        "B computed nothing: {:?}",
        b.lines()
    );
    let square = &b.stats()["square"];
    assert_eq!(square["shared_hits"], 40, "{square}");
    assert!(
        square["hits"].as_u64().unwrap() >= 40,
        "a shared hit is a hit: {square}"
    );
}

/// Keeps a copy of a build (the scratch crate's library path is rebuilt in
/// place by the next build) as `dir/name`.
fn keep(library: &Path, dir: &Path, name: &str) -> PathBuf {
    let kept = dir.join(name);
    std::fs::copy(library, &kept).unwrap();
    kept
}

#[test]
fn a_build_whose_body_changed_never_sees_them_but_one_that_changed_other_code_does() {
    // The code identity names the module path too, so all four hosts run
    // builds of one crate: the original, a VERSION bump, a new square body.
    let builds = tempfile::tempdir().unwrap();
    let copy = Scratch::copy_of("example-plugin", "kw_shared_identity");
    let original = keep(&copy.build(), builds.path(), "original.so");
    copy.edit(|s| {
        s.replace(
            r#"pub const VERSION: &str = "v1";"#,
            r#"pub const VERSION: &str = "v2";"#,
        )
    });
    let version_bump = keep(&copy.build(), builds.path(), "version-bump.so");
    copy.edit(|s| {
        s.replace(
            "    x.checked_mul(x)\n",
            "    x.checked_mul(x)\n        .and_then(|v| v.checked_add(1))\n",
        )
    });
    let new_body = keep(&copy.build(), builds.path(), "new-body.so");

    let redis = RedisServer::start();
    let a = shared_host(&original, &redis);
    for x in 1..=10 {
        square_is(&a, x, x * x);
    }
    wait_writes(&a, "square", 10);
    let a_entries: BTreeMap<Vec<u8>, Vec<u8>> = redis
        .keys(SQUARE_KEYS)
        .into_iter()
        .map(|k| {
            let v = redis.get(&k).unwrap();
            (k, v)
        })
        .collect();
    assert_eq!(a_entries.len(), 10);

    // Only VERSION changed: square's code is the same, its entries shared.
    let b = shared_host(&version_bump, &redis);
    assert_eq!(b.call("version", &[]), "v2", "B runs the new build");
    for x in 1..=10 {
        square_is(&b, x, x * x);
    }
    assert_eq!(b.count("Squaring"), 0, "{:?}", b.lines());
    assert_eq!(figure(&b, "square", "shared_hits"), 10);

    // square's body changed: its own answers, nothing of A's.
    let c = shared_host(&new_body, &redis);
    square_is(&c, 10, 101);
    c.wait_for("Squaring 10");
    for x in 1..=9 {
        square_is(&c, x, x * x + 1);
    }
    assert_eq!(figure(&c, "square", "shared_hits"), 0);
    wait_writes(&c, "square", 10);

    // Both codes' entries are in Redis, A's untouched.
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for key in redis.keys(SQUARE_KEYS) {
        *by_code.entry(code_of(&key)).or_default() += 1;
    }
    assert_eq!(by_code.len(), 2, "two codes of square: {by_code:?}");
    assert!(by_code.values().all(|&n| n == 10), "{by_code:?}");
    for (key, value) in &a_entries {
        assert_eq!(
            redis.get(key).as_ref(),
            Some(value),
            "A's entry {} changed",
            String::from_utf8_lossy(key)
        );
    }

    // A fresh host on the original build still answers from A's entries.
    let d = shared_host(&original, &redis);
    square_is(&d, 10, 100);
    assert_eq!(d.count("Squaring"), 0, "{:?}", d.lines());
    assert_eq!(figure(&d, "square", "shared_hits"), 1);
}

#[test]
fn redis_killed_mid_storm_and_restarted_loses_no_call() {
    const THREADS: u64 = 4;
    const CALLS: u64 = 150;
    let mut redis = RedisServer::start();
    let host = shared_host(&built_library("example-plugin"), &redis);
    let warned = host.count("shared tier");
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Each thread makes at least CALLS calls on its own keys, and goes on
    // until told to stop: calls run before the kill, while Redis is down,
    // and after the restart, whatever the speed of the machine.
    let storm: Vec<_> = (0..THREADS)
        .map(|t| {
            let socket = host.socket().to_owned();
            let (answered, stop) = (Arc::clone(&answered), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut conn = Connection::to(&socket);
                let mut wrong = Vec::new();
                let mut i = 0;
                while i < CALLS || !stop.load(Ordering::SeqCst) {
                    let x = 1_000_000 * (t + 1) + i;
                    match conn.call("square", json!([x])) {
                        Some(a) if a["ok"] == true && a["result"] == json!(x * x) => {}
                        other => wrong.push(format!("square({x}) answered {other:?}")),
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
                wrong
            })
        })
        .collect();
    let at_least = |n: u64, what: &str| {
        let target = answered.load(Ordering::SeqCst) + n;
        eventually(what, || answered.load(Ordering::SeqCst) >= target);
    };
    at_least(THREADS * CALLS / 4, "a quarter of the storm is answered");
    redis.kill();
    host.wait_for_nth("shared tier", warned + 1);
    at_least(100, "100 calls answered while Redis is down");
    redis.restart();
    at_least(100, "100 calls answered after the restart");
    stop.store(true, Ordering::SeqCst);
    let wrong: Vec<String> = storm
        .into_iter()
        .flat_map(|t| t.join().expect("a storm thread panicked"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} calls failed, the first: {:?}",
        wrong.len(),
        answered.load(Ordering::SeqCst),
        &wrong[..wrong.len().min(5)]
    );

    // The tier comes back (after its backoff): new entries reach the
    // restarted, empty server.
    let writes = figure(&host, "square", "shared_writes");
    let mut x = 10_000_000u64;
    eventually(
        "new entries are written to the restarted Redis and the tier is connected",
        || {
            x += 1;
            square_is(&host, x, x * x);
            figure(&host, "square", "shared_writes") > writes
                && !redis.keys(SQUARE_KEYS).is_empty()
                && host.status()["shared"]["state"] == "connected"
        },
    );
    let lines = host.count("shared tier") - warned;
    assert!(
        (1..=3).contains(&lines),
        "one warning for the outage (and its end), not one per call: {lines} lines: {:?}",
        host.lines()
            .iter()
            .filter(|l| l.contains("shared tier"))
            .collect::<Vec<_>>()
    );
}

/// Sends SIGCONT to a SIGSTOPped server when dropped, so a failing assert
/// never leaves it stopped.
struct Resume<'a>(&'a RedisServer);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.stop_signal(libc::SIGCONT);
    }
}

#[test]
fn a_stalled_redis_costs_at_most_the_timeout() {
    const STALL: Duration = Duration::from_secs(2);
    let redis = RedisServer::start();
    let host = shared_host(&built_library("example-plugin"), &redis);
    // The connection is up and used before the stall.
    square_is(&host, 1, 1);
    wait_writes(&host, "square", 1);
    let warned = host.count("shared tier");
    let mut conn = host.connect();

    redis.stop_signal(libc::SIGSTOP);
    let resume = Resume(&redis);
    let stalled = Instant::now();
    let mut slowest = Duration::ZERO;
    for x in 2..22u64 {
        let started = Instant::now();
        let answer = conn.call("square", json!([x])).expect("the host answers");
        let took = started.elapsed();
        assert_eq!(answer["result"], json!(x * x), "{answer}");
        assert!(
            took < Duration::from_secs(1),
            "square({x}) took {took:?} while Redis was stalled"
        );
        slowest = slowest.max(took);
        // The calls spread over the whole stall.
        std::thread::sleep(STALL / 20);
    }
    std::thread::sleep(STALL.saturating_sub(stalled.elapsed()));
    drop(resume);
    eprintln!("20 calls during a {STALL:?} stall: the slowest took {slowest:?}");
    host.wait_for_nth("shared tier", warned + 1);

    // Resumed, the tier is used again.
    let mut x = 1_000u64;
    eventually("the tier is connected again after SIGCONT", || {
        x += 1;
        square_is(&host, x, x * x);
        host.status()["shared"]["state"] == "connected"
    });
}

#[test]
fn garbage_in_redis_is_refused_and_counted_never_served() {
    let redis = RedisServer::start();
    let lib = built_library("example-plugin");
    let a = shared_host(&lib, &redis);
    // square(x)'s key, found as the one key its write added.
    let mut key_of: Vec<Vec<u8>> = Vec::new();
    for x in 1..=6u64 {
        let before: HashSet<Vec<u8>> = redis.keys(SQUARE_KEYS).into_iter().collect();
        square_is(&a, x, x * x);
        wait_writes(&a, "square", x);
        let mut added: Vec<Vec<u8>> = redis
            .keys(SQUARE_KEYS)
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        assert_eq!(added.len(), 1, "square({x}) wrote one key");
        key_of.push(added.pop().unwrap());
    }
    drop(a);
    let real: Vec<Vec<u8>> = key_of
        .iter()
        .map(|k| redis.get(k).expect("a written value"))
        .collect();
    assert!(real.iter().all(|v| v.len() > HEADER_LEN));

    // One kind of damage per key.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..200)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    assert!(!random.starts_with(MAGIC));
    redis.set(&key_of[0], &random);
    redis.set(&key_of[1], &real[1][..real[1].len() - 1]);
    let mut flipped = real[2].clone();
    *flipped.last_mut().unwrap() ^= 0x01;
    redis.set(&key_of[2], &flipped);
    redis.set(&key_of[3], b"");
    // 65 MiB (`KWSH`, then zeros), made by the server, not sent.
    redis.cmd(&[b"SET", &key_of[4], MAGIC]).ok();
    let len = redis
        .cmd(&[b"SETRANGE", &key_of[4], b"68157440", b"x"])
        .integer();
    assert_eq!(len, 68_157_441);
    // A valid value, of another key: square(5)'s under square(6)'s key.
    redis.set(&key_of[5], &real[4]);
    let damage = [
        "200 random bytes",
        "the value truncated by one byte",
        "a payload byte flipped",
        "an empty string",
        "65 MiB",
        "another key's valid value",
    ];
    const BAD: u64 = 6;

    // Each refused (counted as it is read), computed again, never served.
    let mut b = shared_host(&lib, &redis);
    for (x, what) in (1..=BAD).zip(damage) {
        let refused = figure(&b, "square", "shared_refused");
        square_is(&b, x, x * x);
        b.wait_for(&format!("Squaring {x}"));
        assert_eq!(
            figure(&b, "square", "shared_refused"),
            refused + 1,
            "square({x}): {what} in Redis is refused"
        );
    }
    let square = &b.stats()["square"];
    assert!(
        square["shared_refused"].as_u64().unwrap() >= BAD,
        "every bad value is refused: {square}"
    );
    assert!(
        square["shared_errors"].as_u64().unwrap() >= BAD,
        "refusals are errors too: {square}"
    );
    assert_eq!(square["shared_hits"], 0, "{square}");
    assert!(b.is_running());

    // The recomputed values replace the garbage.
    wait_writes(&b, "square", BAD);
    for (x, key) in (1..).zip(&key_of) {
        let value = redis.get(key).expect("a value");
        assert!(
            value.starts_with(MAGIC) && value.len() < 1024,
            "square({x}): {}",
            brief(&value)
        );
    }
}

#[test]
fn reset_shared_drops_this_builds_shared_entries_and_plain_reset_stays_local() {
    let redis = RedisServer::start();
    let lib = built_library("example-plugin");
    let a = shared_host(&lib, &redis);
    for x in 1..=5 {
        square_is(&a, x, x * x);
    }
    assert_eq!(a.call("fib", &["10"]), 55);
    wait_writes(&a, "square", 5);
    wait_writes(&a, "fib", 11);
    assert_eq!(redis.keys(SQUARE_KEYS).len(), 5);
    assert_eq!(redis.keys(FIB_KEYS).len(), 11);

    // A plain reset is local: it says so, and Redis keeps the entries.
    let out = a.cli(&["reset", "square"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("local"),
        "{out:?}"
    );
    assert_eq!(figure(&a, "square", "entries"), 0);
    assert_eq!(redis.keys(SQUARE_KEYS).len(), 5);
    let b = shared_host(&lib, &redis);
    for x in 1..=5 {
        square_is(&b, x, x * x);
    }
    assert_eq!(b.count("Squaring"), 0, "{:?}", b.lines());
    assert_eq!(figure(&b, "square", "shared_hits"), 5);

    // reset --shared drops square's shared entries, and only square's.
    let out = a.cli(&["reset", "square", "--shared"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("shared"),
        "{out:?}"
    );
    assert_eq!(redis.keys(SQUARE_KEYS), Vec::<Vec<u8>>::new());
    assert_eq!(redis.keys(FIB_KEYS).len(), 11, "fib's entries stay");
    assert_eq!(figure(&a, "square", "entries"), 0);

    // Without a shared tier there is nothing to reset there: an error.
    let plain = HostProcess::start(&lib, &[]);
    plain.wait_for("generation 1 loaded");
    assert_eq!(plain.status()["shared"], Value::Null);
    let out = plain.cli(&["reset", "square", "--shared"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("shared"), "{out:?}");
}

#[test]
fn an_unreachable_server_at_start_never_stops_a_call() {
    let lib = built_library("example-plugin");
    // Port 1: nothing listens, the connection is refused.
    let url = "redis://127.0.0.1:1";
    let host = HostProcess::start(&lib, &["--shared", url]);
    host.wait_for("generation 1 loaded");
    square_is(&host, 7, 49);
    let line = host.wait_for("shared tier");
    assert!(
        line.contains("127.0.0.1:1"),
        "the warning names the server: {line}"
    );
    let shared = &host.status()["shared"];
    assert_eq!(shared["url"], url, "{shared}");
    assert_ne!(shared["state"], "connected", "{shared}");
    assert!(shared["last_error"].is_string(), "{shared}");
    figure(&host, "square", "shared_errors");
    square_is(&host, 8, 64);
    assert_eq!(
        host.count("shared tier"),
        1,
        "one warning: {:?}",
        host.lines()
    );

    // A URL that is not one is a usage error, before anything starts.
    let runtime = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(keepwarm_bin())
        .arg("run")
        .arg(&lib)
        .args(["--no-repl", "--shared", "not-a-url", "--socket"])
        .arg(runtime.path().join("bad.sock"))
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keepwarm run --shared not-a-url is still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not-a-url"), "{stderr}");
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("a base64 string"))
        .unwrap()
}

fn ok(response: Option<Value>) -> Value {
    let response = response.expect("the host answered");
    assert_eq!(response["ok"], true, "{response}");
    response["result"].clone()
}

#[test]
fn keepwarm_serve_shares_through_the_protocol() {
    const CODE: &str = "00c0ffee12345678";
    const OTHER_CODE: &str = "00c0ffee87654321";
    let redis = RedisServer::start();
    let a = shared_serve(&redis);
    let mut c = a.connect();
    ok(c.request(&json!({"cmd": "open", "cache": "square", "code": CODE})));
    let lookup =
        ok(c.request(&json!({"cmd": "get_or_wait", "cache": "square", "key": b64(b"10")})));
    assert_eq!(lookup["lease"], true, "{lookup}");
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "square", "key": b64(b"10"), "value": b64(b"100"),
        "stamp": lookup["stamp"]
    })));
    assert_eq!(put["stored"], true, "{put}");
    // A cache opened without a code is never shared (it is put first: the
    // writer would have written it before square's entry).
    ok(c.request(&json!({"cmd": "open", "cache": "plain"})));
    let put = ok(c.request(&json!({
        "cmd": "put", "cache": "plain", "key": b64(b"k"), "value": b64(b"v")
    })));
    assert_eq!(put["stored"], true, "{put}");
    wait_writes(&a, "square", 1);
    assert_eq!(redis.keys(SQUARE_KEYS).len(), 1);
    assert_eq!(redis.keys("keepwarm:v1:*:plain:*"), Vec::<Vec<u8>>::new());

    // Another serve, same code: a hit with the same bytes.
    let b = shared_serve(&redis);
    let mut c = b.connect();
    ok(c.request(&json!({"cmd": "open", "cache": "square", "code": CODE})));
    let got = ok(c.request(&json!({"cmd": "get", "cache": "square", "key": b64(b"10")})));
    assert_eq!(got["found"], true, "{got}");
    assert_eq!(unb64(&got["value"]), b"100");
    assert_eq!(figure(&b, "square", "shared_hits"), 1);
    ok(c.request(&json!({"cmd": "open", "cache": "plain"})));
    let got = ok(c.request(&json!({"cmd": "get", "cache": "plain", "key": b64(b"k")})));
    assert_eq!(got["found"], false, "{got}");

    // Another code: a miss.
    let third = shared_serve(&redis);
    let mut c = third.connect();
    ok(c.request(&json!({"cmd": "open", "cache": "square", "code": OTHER_CODE})));
    let got = ok(c.request(&json!({"cmd": "get", "cache": "square", "key": b64(b"10")})));
    assert_eq!(got["found"], false, "{got}");
    assert_eq!(figure(&third, "square", "shared_hits"), 0);
}
