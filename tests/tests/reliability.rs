//! The fault matrix of docs/RELIABILITY.md: every way a reload can go wrong,
//! with real plugins built by cargo and real files on disk. In each, the
//! running generation keeps serving and no cached entry is lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keepwarm_tests::{built_library, replace_atomically, HostProcess};

/// A watched library path in a fresh directory, holding a copy of `package`.
fn watched_copy(package: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libplugin.so");
    std::fs::copy(built_library(package), &path).unwrap();
    (dir, path)
}

/// Starts a host on a copy of swap_a with a warm `sq` cache; returns it.
fn serving_swap_a(path: &Path) -> HostProcess {
    let host = HostProcess::start(path, &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(
        host.call("whole", &["7"]),
        serde_json::json!(["a", 49, "a"])
    );
    host
}

/// The old generation still answers, and the cached entry is still there.
fn still_serving_a(host: &HostProcess) {
    assert_eq!(host.call("version", &[]), "a");
    assert_eq!(
        host.call("whole", &["7"]),
        serde_json::json!(["a", 49, "a"])
    );
    let sq = &host.stats()["sq"];
    assert_eq!(sq["entries"], 1, "the cached entry survived: {sq}");
    assert!(sq["hits"].as_u64().unwrap() >= 1, "{sq}");
    assert_eq!(host.status()["generation"], 1);
}

/// Writes `bytes` over `path` through a temporary file and a rename, and
/// waits for the host's refusal; returns the refusal line.
fn refused(host: &HostProcess, path: &Path, bytes: &[u8], n: usize) -> String {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    host.wait_for_nth("refused libplugin.so", n)
}

#[test]
fn not_a_library_is_refused_with_what_it_is() {
    let (_dir, path) = watched_copy("swap_a");
    let host = serving_swap_a(&path);

    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let line = refused(&host, &path, &random, 1);
    assert!(
        line.contains("not an ELF file") && line.contains("generation 1 keeps serving"),
        "{line}"
    );

    let line = refused(&host, &path, b"#!/bin/sh\necho I am a text file\n", 2);
    assert!(line.contains("a text file"), "{line}");

    let no_entry = std::fs::read(built_library("no_entry_symbol")).unwrap();
    let line = refused(&host, &path, &no_entry, 3);
    assert!(line.contains("no `keepwarm_plugin` symbol"), "{line}");

    let abi_v2 = std::fs::read(built_library("abi_v2")).unwrap();
    let line = refused(&host, &path, &abi_v2, 4);
    assert!(
        line.contains("built for keepwarm ABI 2, this host speaks ABI 1"),
        "{line}"
    );

    // An empty file is what a writer leaves for an instant; one that stays
    // empty is reported once the retry window is over.
    let line = refused(&host, &path, b"", 5);
    assert!(line.contains("empty file"), "{line}");

    still_serving_a(&host);
    let status = host.status();
    assert_eq!(status["failed_reloads"], 5, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("empty file"),
        "{status}"
    );
    // And a good build after all that loads normally.
    replace_atomically(&built_library("swap_b"), &path);
    host.wait_for("generation 2 reloaded");
    assert_eq!(
        host.call("whole", &["7"]),
        serde_json::json!(["b", 49, "b"])
    );
}

#[test]
fn on_load_panic_or_error_is_refused() {
    let (_dir, path) = watched_copy("swap_a");
    let host = serving_swap_a(&path);
    let line = refused(
        &host,
        &path,
        &std::fs::read(built_library("panics_on_load")).unwrap(),
        1,
    );
    assert!(
        line.contains("on_load panicked") && line.contains("on_load exploded on purpose"),
        "{line}"
    );
    let line = refused(
        &host,
        &path,
        &std::fs::read(built_library("on_load_error")).unwrap(),
        2,
    );
    assert!(
        line.contains("on_load failed") && line.contains("not configured"),
        "{line}"
    );
    still_serving_a(&host);
    assert_eq!(host.status()["failed_reloads"], 2);
}

#[test]
fn half_written_library_is_not_loaded() {
    let (_dir, path) = watched_copy("swap_a");
    let host = serving_swap_a(&path);
    let new = std::fs::read(built_library("swap_b")).unwrap();
    // The first half, written in place, then a pause long enough for the
    // watcher to look at it several times, then the rest.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&new[..new.len() / 2]).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        host.call("version", &[]),
        "a",
        "the half must not be loaded"
    );
    file.write_all(&new[new.len() / 2..]).unwrap();
    drop(file);
    host.wait_for("generation 2 reloaded");
    assert_eq!(
        host.call("whole", &["7"]),
        serde_json::json!(["b", 49, "b"])
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(host.count("refused"), 0, "{:?}", host.lines());
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("reloaded", 1);
    assert_eq!(
        host.count("reloaded"),
        1,
        "the complete file loads exactly once: {:?}",
        host.lines()
    );
}

#[test]
fn function_panic_is_an_error_and_nothing_else_changes() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    assert_eq!(host.call("depth", &["50"]), 50);
    let before = host.stats()["depth"].clone();
    // Concurrent calls keep working while another call panics.
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            (0..20)
                .map(|i| host.call("ok", &[&i.to_string()]))
                .collect::<Vec<_>>()
        });
        for _ in 0..5 {
            let out = host.cli(&["call", "boom"]);
            assert_eq!(out.status, Some(1), "{out:?}");
            assert!(
                out.stderr
                    .contains("boom panicked: boom: this function always panics"),
                "{out:?}"
            );
        }
        let answers = worker.join().unwrap();
        assert_eq!(
            answers,
            (0..20).map(serde_json::Value::from).collect::<Vec<_>>()
        );
    });
    assert_eq!(host.stats()["depth"]["entries"], before["entries"]);
    assert_eq!(host.call("depth", &["50"]), 50);
    assert_eq!(host.status()["generation"], 1);
}

#[test]
fn deleted_library_keeps_serving_and_a_new_file_loads() {
    let (_dir, path) = watched_copy("swap_a");
    let host = serving_swap_a(&path);
    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    still_serving_a(&host);
    std::fs::copy(built_library("swap_b"), &path).unwrap();
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "b");
    assert_eq!(host.stats()["sq"]["entries"], 1);
    assert_eq!(host.count("refused"), 0, "{:?}", host.lines());
}

#[test]
fn same_build_twice_reloads_once() {
    let (_dir, path) = watched_copy("swap_a");
    let host = serving_swap_a(&path);
    let b = built_library("swap_b");
    replace_atomically(&b, &path);
    host.wait_for("generation 2 reloaded");
    // The same bytes again: a second burst, an in-place copy, a touch.
    replace_atomically(&b, &path);
    std::fs::copy(&b, &path).unwrap();
    let now = std::fs::File::options().write(true).open(&path).unwrap();
    now.set_modified(std::time::SystemTime::now()).unwrap();
    drop(now);
    std::thread::sleep(Duration::from_millis(500));
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("reloaded", 1);
    assert_eq!(host.count("reloaded"), 1, "{:?}", host.lines());
    assert_eq!(host.status()["generation"], 2);
}

#[test]
fn reentrant_cache_use_does_not_deadlock() {
    // on_load of `faults` puts and reads back a cache entry; `depth` recurses
    // through the cache 500 levels deep. The harness's waits time out (and
    // fail the test) instead of hanging on a deadlock.
    let host = HostProcess::start(&built_library("faults"), &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("booted", &[]), "yes");
    assert_eq!(host.call("depth", &["500"]), 500);
    assert_eq!(host.stats()["depth"]["misses"], 501);
}
