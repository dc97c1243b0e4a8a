//! Reloads under load, many reloads, and contention: the in-process rows of
//! the fault matrix (docs/RELIABILITY.md). These drive the `keepwarm`
//! library's real Host, loader and watcher on real files, so that thousands
//! of calls per second can be checked one by one. Figures are printed for
//! the record (`cargo test -p keepwarm-tests --test load -- --nocapture`),
//! never asserted: the machine is shared and noisy.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepwarm::{watcher, Config, Host};
use keepwarm_tests::{built_library, replace_atomically};
use serde_json::json;

/// The tests of this file measure the process (RSS, mappings): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A host on a copy of swap_a in a fresh directory, watching it.
fn host_on_swap_a() -> (tempfile::TempDir, PathBuf, Arc<Host>, watcher::Watch) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libswap.so");
    std::fs::copy(built_library("swap_a"), &path).unwrap();
    let config = Config::new(&path).on_event(|event| {
        if let keepwarm::Event::Refused { .. } = event {
            eprintln!("{event:?}");
        }
    });
    let host = Host::new(config).unwrap();
    host.reload(false).unwrap();
    let watch = watcher::watch(Arc::clone(&host)).unwrap();
    (dir, path, host, watch)
}

fn generation(host: &Host) -> u64 {
    host.current().map_or(0, |g| g.number)
}

/// Waits (generously) until the host serves generation `n`.
fn wait_for_generation(host: &Host, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while generation(host) < n {
        assert!(
            Instant::now() < deadline,
            "generation {n} never came; status: {:?}",
            host.status()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The number of shadow files once the last swap's old generation has
/// retired. It retires on whichever thread drops its last reference, which
/// may still be under way when the new generation's number shows, so this
/// waits (up to 10 s) for the count to reach one rather than race it.
fn settled_shadow_files(host: &Host) -> usize {
    // The host's lock file is not a shadow copy.
    let count = || {
        std::fs::read_dir(host.shadow_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "lock")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    count()
}

/// Replaces `path` with `from`: by atomic rename, or by copying over the
/// file in place (truncate, then write).
fn swap(from: &Path, path: &Path, in_place: bool) {
    if in_place {
        std::fs::copy(from, path).unwrap();
    } else {
        replace_atomically(from, path);
    }
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn shadow_mappings() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut files: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("/gen-"))
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    files.sort();
    files.dedup();
    files.len()
}

#[test]
fn load_during_reloads_loses_no_call_and_no_entry() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, path, host, _watch) = host_on_swap_a();
    const KEYS: u64 = 100;
    for x in 0..KEYS {
        assert_eq!(
            host.call_json("whole", &[x.into()]).unwrap(),
            json!(["a", x * x, "a"])
        );
    }
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let longest = AtomicU64::new(0);
    let (a, b) = (built_library("swap_a"), built_library("swap_b"));
    let started = Instant::now();
    const SWAPS: u64 = 200;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (host, stop, calls, failures, longest) =
                (&host, &stop, &calls, &failures, &longest);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let x = i % KEYS;
                    let begun = Instant::now();
                    let (memo, answer) = if i % 2 == 0 {
                        (true, host.call_json("whole", &[x.into()]))
                    } else {
                        (false, host.call_json("plain", &[x.into()]))
                    };
                    longest.fetch_max(begun.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let whole = match &answer {
                        Ok(v) if memo => {
                            v[0] == v[2]
                                && (v[0] == "a" || v[0] == "b")
                                && v[1] == x * x
                                && v.as_array().unwrap().len() == 3
                        }
                        Ok(v) => (v[0] == "a" || v[0] == "b") && v[1] == x + 1,
                        Err(_) => false,
                    };
                    if !whole {
                        eprintln!("bad answer for {x}: {answer:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        for n in 0..SWAPS {
            let from = if n % 2 == 0 { &b } else { &a };
            swap(from, &path, n % 4 >= 2);
            wait_for_generation(&host, n + 2);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed();
    let calls = calls.into_inner();
    eprintln!(
        "load: {SWAPS} swaps (half by rename, half by in-place copy) in {:.1} s, {calls} calls by 4 threads, {:.0} calls/s, longest call {:.1} ms, {} failed",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64(),
        longest.into_inner() as f64 / 1000.0,
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(failures.into_inner(), 0);
    assert!(calls > SWAPS, "the callers must have run during the swaps");
    assert_eq!(generation(&host), SWAPS + 1);
    let sq = &host.stats(Some("sq")).unwrap()[0];
    assert_eq!(
        (sq.entries, sq.evictions, sq.resets),
        (KEYS, 0, 0),
        "no cached entry lost: {sq:?}"
    );
    assert_eq!(host.status().failed_reloads, 0);
}

#[test]
fn a_thousand_reloads_keep_shadow_files_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, path, host, _watch) = host_on_swap_a();
    let (a, b) = (built_library("swap_a"), built_library("swap_b"));
    let rss_before = vm_rss_kib();
    let maps_before = shadow_mappings();
    const RELOADS: u64 = 1000;
    let started = Instant::now();
    for n in 0..RELOADS {
        swap(if n % 2 == 0 { &b } else { &a }, &path, false);
        wait_for_generation(&host, n + 2);
        if n == 99 {
            eprintln!(
                "reloads: after 100, RSS +{} KiB, shadow mappings {}",
                vm_rss_kib() - rss_before,
                shadow_mappings()
            );
        }
    }
    let shadow_files = settled_shadow_files(&host);
    let rss_growth = vm_rss_kib().saturating_sub(rss_before);
    eprintln!(
        "reloads: {RELOADS} in {:.1} s; RSS +{rss_growth} KiB ({:.1} KiB per reload); shadow files now {shadow_files}; mapped shadow libraries {} (before {maps_before})",
        started.elapsed().as_secs_f64(),
        rss_growth as f64 / RELOADS as f64,
        shadow_mappings()
    );
    assert_eq!(
        shadow_files, 1,
        "only the live generation's shadow copy remains"
    );
    assert_eq!(
        host.call_json("version", &[]).unwrap(),
        if RELOADS.is_multiple_of(2) { "a" } else { "b" }
    );
}

#[test]
fn contended_cache_figures_stay_consistent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let host = Host::new(Config::new(built_library("faults"))).unwrap();
    host.reload(false).unwrap();
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 5_000;
    // Half the threads find the cache by name, half through a handle.
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let host = &host;
            s.spawn(move || {
                if t % 2 == 0 {
                    host.call_json("hammer", &["contended".into(), 100.into(), ROUNDS.into()])
                } else {
                    host.call_json("hammer_handle", &[100.into(), ROUNDS.into()])
                }
                .unwrap()
            });
        }
    });
    let c = &host.stats(Some("contended")).unwrap()[0];
    assert_eq!(
        c.hits + c.misses,
        THREADS * ROUNDS,
        "every lookup counted once: {c:?}"
    );
    assert!(c.entries <= c.capacity && c.capacity == 64, "{c:?}");
    assert_eq!(c.inserts, c.misses, "each miss stored once: {c:?}");
    // Two threads that miss the same key both store it: the second store
    // replaces, it does not evict.
    assert!(c.evictions + c.entries <= c.inserts, "{c:?}");
    assert_eq!(
        c.bytes,
        c.entries * keepwarm::cache::entry_bytes(&[0; 8], &[0; 8]),
        "8-byte keys and values: {c:?}"
    );
}

#[test]
fn reloads_of_a_plugin_with_thread_local_destructors_are_measured() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, path, host, _watch) = host_on_swap_a();
    let (a, b) = (built_library("swap_a"), built_library("swap_b"));
    let rss_before = vm_rss_kib();
    const RELOADS: u64 = 100;
    for n in 0..RELOADS {
        // Each generation touches its thread-local on this thread.
        host.call_json("tls", &[]).unwrap();
        swap(if n % 2 == 0 { &b } else { &a }, &path, false);
        wait_for_generation(&host, n + 2);
    }
    let shadow_files = settled_shadow_files(&host);
    eprintln!(
        "tls reloads: {RELOADS} reloads of a plugin whose thread-local has a destructor: mapped shadow libraries {}, RSS +{} KiB, shadow files in the directory {shadow_files}",
        shadow_mappings(),
        vm_rss_kib().saturating_sub(rss_before)
    );
    assert_eq!(
        shadow_files, 1,
        "retired shadow files are unlinked even when glibc keeps them mapped"
    );
}
