//! Durable caches (`--persist DIR`, issue 13): a host started again on DIR
//! answers from the store after SIGTERM or SIGKILL; no acknowledged entry
//! is lost to a kill at a random moment; identity and resets survive the
//! restart; a damaged store, a second host and a full disk never stop one.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use keepwarm_tests::{built_library, keepwarm_bin, HostProcess, Scratch, Tmpfs};
use serde_json::json;

fn host_on(lib: &Path, dir: &Path) -> HostProcess {
    let host = HostProcess::start(lib, &["--persist", dir.to_str().unwrap()]);
    host.wait_for("generation 1 loaded");
    host
}

fn figures(host: &HostProcess, cache: &str) -> serde_json::Value {
    host.stats()[cache].clone()
}

#[test]
fn a_restart_after_sigterm_or_sigkill_answers_from_the_store() {
    let lib = built_library("example-plugin");
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_on(&lib, dir.path());
    assert_eq!(host.call("square", &["12"]), 144);
    assert_eq!(host.call("fib", &["80"]), json!(23416728348467685u64));
    assert!(host.wait_for("caches persist in").contains("caches.sqlite"));
    assert!(host.stop(libc::SIGTERM).success());
    // A clean exit leaves the store and nothing that only a running host
    // needs: no lock file, an empty write-ahead log.
    assert!(!dir.path().join("keepwarm.lock").exists());
    assert!(std::fs::metadata(dir.path().join("caches.sqlite-wal")).map_or(0, |m| m.len()) == 0);

    for round in ["after SIGTERM", "after SIGKILL"] {
        let mut host = host_on(&lib, dir.path());
        assert_eq!(host.call("square", &["12"]), 144);
        assert_eq!(host.call("fib", &["80"]), json!(23416728348467685u64));
        let square = figures(&host, "square");
        let fib = figures(&host, "fib");
        assert_eq!(
            (square["hits"].as_u64(), square["misses"].as_u64()),
            (Some(1), Some(0)),
            "{round}: {square}"
        );
        assert_eq!(
            (fib["hits"].as_u64(), fib["misses"].as_u64()),
            (Some(1), Some(0)),
            "{round}: {fib}"
        );
        assert_eq!(host.count("Squaring"), 0, "{round}: nothing recomputed");
        assert_eq!(fib["persisted_entries"], 81, "{round}: {fib}");
        assert!(
            square["persisted_bytes"].as_u64().unwrap() > 0,
            "{round}: {square}"
        );
        assert_eq!(square["store_errors"], 0);
        host.stop(libc::SIGKILL);
    }
}

/// A small random number generator (xorshift), seeded from the clock, so
/// the kill moments differ between runs; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
fn no_acknowledged_entry_is_lost_to_sigkill_at_a_random_moment() {
    let lib = built_library("example-plugin");
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next_key = 0u64;
    for round in 0..20 {
        let mut host = host_on(&lib, dir.path());
        let socket = host.socket().to_owned();
        let start = next_key;
        // A storm of puts (each call a miss that stores), on two
        // connections; killed at a random moment.
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let socket = socket.clone();
                std::thread::spawn(move || {
                    let mut conn = keepwarm_tests::Connection::to(&socket);
                    let mut acked = Vec::new();
                    let mut key = start + w;
                    while let Some(answer) = conn.call("square", json!([key])) {
                        if answer["ok"] == true {
                            acked.push(key);
                        }
                        key += 2;
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + rng.next(400)));
        host.stop(libc::SIGKILL);
        for w in writers {
            let acked = w.join().unwrap();
            next_key = next_key.max(acked.last().map_or(start, |k| k + 2));
            acknowledged.extend(acked);
        }
        next_key += 2;
        assert!(
            !acknowledged.is_empty(),
            "round {round}: nothing was acknowledged"
        );
    }
    // Every acknowledged entry answers from the store: no miss, no recomputation.
    let host = host_on(&lib, dir.path());
    let mut conn = host.connect();
    for &key in &acknowledged {
        let answer = conn.call("square", json!([key])).unwrap();
        assert_eq!(answer["result"], json!(key * key));
    }
    let square = figures(&host, "square");
    let lost = square["misses"].as_u64().unwrap();
    eprintln!(
        "seed {seed}: {} acknowledged entries over 20 kills, {lost} lost",
        acknowledged.len()
    );
    assert_eq!(lost, 0, "acknowledged but lost (seed {seed}): {square}");
    assert_eq!(square["hits"].as_u64().unwrap(), acknowledged.len() as u64);
}

#[test]
fn a_version_bump_while_down_resets_that_cache_only_and_a_reset_stays_reset() {
    let copy = Scratch::copy_of("example-plugin", "kw_persist_identity");
    let lib = copy.build();
    let dir = tempfile::tempdir().unwrap();
    let mut host = host_on(&lib, dir.path());
    host.call("square", &["3"]);
    host.call("fib", &["20"]);
    host.call("count_primes", &["100"]);
    let reset = host.cli(&["reset", "count_primes"]);
    assert_eq!(reset.status, Some(0), "{reset:?}");
    host.stop(libc::SIGKILL);

    // Rebuilt while the host was down with square's version bumped.
    copy.edit(|s| {
        s.replace(
            "#[memo(max_entries = 100_000)]",
            "#[memo(max_entries = 100_000, version = 2)]",
        )
    });
    copy.build();
    let host = host_on(&lib, dir.path());
    let line = host.wait_for("generation 1 loaded");
    assert!(
        line.contains("square"),
        "the load says square was reset: {line}"
    );
    host.call("square", &["3"]);
    host.call("fib", &["20"]);
    host.call("count_primes", &["100"]);
    let stats = host.stats();
    assert_eq!(
        stats["square"]["misses"], 1,
        "version 2 never sees version 1's entry"
    );
    host.wait_for("Squaring 3");
    assert_eq!(stats["fib"]["misses"], 0, "fib's entries are kept");
    assert_eq!(
        stats["count_primes"]["misses"], 1,
        "the reset before the restart holds"
    );
}

#[test]
fn a_damaged_store_is_moved_aside_and_the_host_starts_empty() {
    let lib = built_library("example-plugin");
    let dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(dir.path().join("caches.sqlite"), &garbage).unwrap();
    let host = host_on(&lib, dir.path());
    let line = host.wait_for("was damaged");
    assert!(
        line.contains("moved it to") && line.contains("kept"),
        "{line}"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("caches.sqlite.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage, "kept as it was");
    assert_eq!(host.call("square", &["4"]), 16);
    assert_eq!(figures(&host, "square")["persisted_entries"], 1);

    // A truncated store is damage too.
    drop(host);
    let file = dir.path().join("caches.sqlite");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let _ = std::fs::remove_file(dir.path().join("caches.sqlite-wal"));
    let host = host_on(&lib, dir.path());
    let line = host.wait_for("was damaged");
    assert!(line.contains("truncated"), "{line}");
    assert_eq!(host.call("square", &["4"]), 16);
}

#[test]
fn a_second_host_on_the_same_dir_is_refused_with_the_first_ones_pid() {
    let lib = built_library("example-plugin");
    let dir = tempfile::tempdir().unwrap();
    let first = host_on(&lib, dir.path());
    first.call("square", &["5"]);
    let runtime = tempfile::tempdir().unwrap();
    let out = Command::new(keepwarm_bin())
        .args([
            "run",
            lib.to_str().unwrap(),
            "--no-repl",
            "--persist",
            dir.path().to_str().unwrap(),
        ])
        .arg("--socket")
        .arg(runtime.path().join("second.sock"))
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another keepwarm host (PID {})",
            first.worker_pid()
        )),
        "{stderr}"
    );
    // The first host and its store are untouched.
    assert_eq!(first.call("square", &["5"]), 25);
    assert_eq!(figures(&first, "square")["hits"], 1);
}

#[test]
fn a_full_disk_fails_puts_softly_and_calls_still_answer() {
    let Some(disk) = Tmpfs::mount(4) else {
        eprintln!("SKIPPED a_full_disk_…: mounting a tmpfs needs root");
        return;
    };
    let lib = built_library("example-plugin");
    let dir = disk.0.path().join("store");
    let host = host_on(&lib, &dir);
    host.call("square", &["1"]);
    // Fill the file system.
    let filler = disk.0.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
    }
    let mut conn = host.connect();
    let started = Instant::now();
    for key in 2..3000u64 {
        let answer = conn.call("square", json!([key])).unwrap();
        assert_eq!(answer["result"], json!(key * key), "{answer}");
    }
    let square = figures(&host, "square");
    assert!(square["store_errors"].as_u64().unwrap() > 0, "{square}");
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("the cache store failed", 1);
    assert_eq!(
        host.count("the cache store failed"),
        1,
        "one warning: {:?}",
        host.lines()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // Space returns: puts are durable again.
    std::fs::remove_file(&filler).unwrap();
    let errors = square["store_errors"].as_u64().unwrap();
    host.call("square", &["5000"]);
    assert_eq!(
        figures(&host, "square")["store_errors"].as_u64().unwrap(),
        errors
    );
}
