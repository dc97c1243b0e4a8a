//! Memoization through the host: single flight, resets during a
//! computation, cycles — with the real host and a real plugin (`faults`).

use keepwarm_tests::{built_library, HostProcess};

#[test]
fn concurrent_misses_compute_once() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    let answers: Vec<_> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|_| s.spawn(|| host.call("slow_square", &["3"])))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(answers, vec![serde_json::json!(9); 4]);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("computing slow_square 3", 1);
    assert_eq!(
        host.count("computing slow_square 3"),
        1,
        "{:?}",
        host.lines()
    );
    let slow = &host.stats()["slow"];
    assert_eq!(
        (slow["inserts"].as_u64(), slow["entries"].as_u64()),
        (Some(1), Some(1)),
        "{slow}"
    );
}

#[test]
fn reset_during_a_computation_does_not_store_the_stale_value() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    std::thread::scope(|s| {
        let call = s.spawn(|| host.call("slow_square", &["5"]));
        host.wait_for("computing slow_square 5");
        let out = host.cli(&["reset", "slow"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        // The caller still gets its answer...
        assert_eq!(call.join().unwrap(), 25);
    });
    // ...but the value computed before the reset was not put back.
    let slow = &host.stats()["slow"];
    assert_eq!(
        (slow["entries"].as_u64(), slow["resets"].as_u64()),
        (Some(0), Some(1)),
        "{slow}"
    );
    assert_eq!(host.call("slow_square", &["5"]), 25);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("computing slow_square 5", 2);
    assert_eq!(
        host.count("computing slow_square 5"),
        2,
        "the next call computes again"
    );
    assert_eq!(host.stats()["slow"]["entries"], 1);
}

#[test]
fn a_memoization_cycle_is_an_error_not_a_deadlock() {
    let host = HostProcess::start(&built_library("faults"), &[]);
    let out = host.cli(&["call", "cycle", "1"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("memoization cycle in cache `cycle`"),
        "{out:?}"
    );
    // The host is fine and the key is not stuck.
    assert_eq!(host.call("ok", &["7"]), 7);
    assert_eq!(host.cli(&["call", "cycle", "1"]).status, Some(1));
}

/// The example plugin's source, copied, with `square`'s memo attribute made
/// `#[memo(OPTIONS)]`.
fn example_with_square_options(package: &str, options: &str) -> keepwarm_tests::Scratch {
    let plugin = keepwarm_tests::Scratch::copy_of("example-plugin", package);
    plugin.edit(|src| {
        src.replace(
            "#[memo(max_entries = 100_000)]",
            &format!("#[memo({options})]"),
        )
    });
    plugin
}

#[test]
fn changed_code_resets_only_that_cache_when_asked() {
    let plugin = example_with_square_options("kw_memo_reset_on_change", "reset_on_change");
    let host = HostProcess::start(&plugin.build(), &[]);
    assert_eq!(host.call("square", &["10"]), 100);
    assert_eq!(host.call("fib", &["20"]), 6765);

    // A change elsewhere (VERSION) keeps square's cache.
    plugin.edit(|src| src.replace(r#""v1""#, r#""v2""#));
    plugin.build();
    let line = host.wait_for("generation 2 reloaded");
    assert!(!line.contains("reset because"), "{line}");
    assert_eq!(host.stats()["square"]["entries"], 1);

    // A change in square's own code resets square, and only square.
    plugin.edit(|src| src.replace(r#"log!("Squaring {x}");"#, r#"log!("Squaring {x} again");"#));
    plugin.build();
    let line = host.wait_for("generation 3 reloaded");
    assert!(
        line.contains("reset because their code changed: square"),
        "{line}"
    );
    let stats = host.stats();
    assert_eq!(stats["square"]["entries"], 0);
    assert_eq!(stats["fib"]["entries"], 21, "fib stays warm");
    assert_eq!(host.call("square", &["10"]), 100);
    host.wait_for("[gen 3] Squaring 10 again");
}

#[test]
fn a_new_version_tag_resets_the_cache() {
    let plugin = example_with_square_options("kw_memo_version", "version = 1");
    let host = HostProcess::start(&plugin.build(), &[]);
    assert_eq!(host.call("square", &["10"]), 100);
    plugin.edit(|src| src.replace("#[memo(version = 1)]", "#[memo(version = 2)]"));
    plugin.build();
    let line = host.wait_for("generation 2 reloaded");
    assert!(
        line.contains("reset because their code changed: square"),
        "{line}"
    );
    assert_eq!(host.call("square", &["10"]), 100);
    host.wait_for_nth("Squaring 10", 2);
}

#[test]
fn a_changed_return_type_is_a_miss_not_garbage() {
    let plugin = keepwarm_tests::Scratch::copy_of("example-plugin", "kw_memo_return_type");
    let host = HostProcess::start(&plugin.build(), &[]);
    assert_eq!(host.call("square", &["10"]), 100);
    // Same cache, same key, a different return type.
    plugin.edit(|src| {
        src.replace(
            "pub fn square(x: u64) -> Result<u64, String> {",
            "pub fn square(x: u64) -> String {",
        )
        .replace(
            "    x.checked_mul(x)\n        .ok_or_else(|| format!(\"square({x}) overflows u64: x must be below 2^32\"))\n}",
            "    format!(\"{} squared\", x * x)\n}",
        )
    });
    plugin.build();
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("square", &["10"]), "100 squared");
    // Recomputed (the line reaches the test's reader after the answer).
    host.wait_for_nth("Squaring 10", 2);
    assert_eq!(host.call("square", &["10"]), "100 squared");
    assert_eq!(host.count("Squaring 10"), 2);
}

#[test]
fn export_reports_wrong_argument_count_and_type() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    let out = host.cli(&["call", "square"]);
    assert_eq!(out.status, Some(1));
    assert!(
        out.stderr.contains("square takes 1 argument, got 0"),
        "{out:?}"
    );
    let out = host.cli(&["call", "square", "1", "2"]);
    assert!(
        out.stderr.contains("square takes 1 argument, got 2"),
        "{out:?}"
    );
    let out = host.cli(&["call", "square", "-3"]);
    assert!(
        out.stderr.contains("square: argument 1 (-3): expected u64"),
        "{out:?}"
    );
    let out = host.cli(&["call", "count_primes", "99999999999999"]);
    assert_eq!(out.status, Some(1));
    assert!(out.stderr.contains("n must be at most 2^32"), "{out:?}");
}

#[test]
fn raw_abi_plugin_caches_by_hand() {
    let host = HostProcess::start(&built_library("raw-abi-plugin"), &[]);
    assert_eq!(host.call("version", &[]), "raw-abi");
    assert_eq!(host.call("square", &["12"]), 144);
    assert_eq!(host.call("square", &["12"]), 144);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("raw: squaring 12", 1);
    assert_eq!(host.count("raw: squaring 12"), 1);
    let raw = &host.stats()["raw_square"];
    assert_eq!(
        (
            raw["hits"].as_u64(),
            raw["bytes"].as_u64(),
            raw["max_bytes"].as_u64()
        ),
        (
            Some(1),
            Some(keepwarm::cache::entry_bytes(&[0; 8], &[0; 8])),
            Some(16_000)
        )
    );
}

/// `HostCache` handles (`cache_open`, `cache_get_into`, `cache_put_handle`)
/// through a real loaded plugin: small values copied out, large ones lent,
/// every lookup counted once, resets seen, and entries kept across a reload
/// (whose generation opens its own handle).
#[test]
fn cache_handles_copy_small_values_lend_large_ones_and_survive_reloads() {
    use keepwarm::{Config, Host};
    use serde_json::{json, Value};

    let host = Host::new(Config::new(built_library("faults"))).unwrap();
    host.reload(false).unwrap();
    let call = |f: &str, args: Value| host.call_json(f, args.as_array().unwrap()).unwrap();
    // 8 bytes (fits the 64-byte inline buffer), 1,000 (fits get_with's 2 KiB
    // buffer, not Value's), 100,000 (lent by both).
    let sizes = [(1u64, 8u64), (2, 1_000), (3, 100_000)];
    for (key, len) in sizes {
        let digest = call("handled_put", json!([key, len]));
        assert_eq!(digest[0], len);
        assert_eq!(
            call("handled_get", json!([key])),
            digest,
            "get, {len} bytes"
        );
        assert_eq!(
            call("handled_get_with", json!([key])),
            digest,
            "get_with, {len} bytes"
        );
    }
    assert_eq!(call("handled_get", json!([9])), Value::Null);
    assert_eq!(call("handled_get_with", json!([9])), Value::Null);
    let figures = |h: &Host| h.stats(Some("handled")).unwrap()[0].clone();
    let s = figures(&host);
    assert_eq!(
        (s.entries, s.hits, s.misses, s.inserts, s.bytes),
        (
            3,
            6,
            2,
            3,
            [8, 1_000, 100_000]
                .iter()
                .map(|&n| keepwarm::cache::entry_bytes(&[0; 8], &vec![0; n]))
                .sum::<u64>()
        ),
        "{s:?}"
    );

    // HostCache::cached memoizes through the handle: one miss, then hits.
    for _ in 0..3 {
        assert_eq!(call("cube", json!([3])), 27);
    }
    let cubes = host.stats(Some("cubes")).unwrap()[0].clone();
    assert_eq!(
        (cubes.misses, cubes.hits, cubes.entries),
        (1, 2, 1),
        "{cubes:?}"
    );

    // A reload keeps every entry; the new generation resolves its own handle.
    host.reload(true).unwrap();
    assert_eq!(host.current().unwrap().number, 2);
    assert_eq!(call("handled_get_with", json!([2]))[0], 1_000);
    assert_eq!(call("handled_get", json!([3]))[0], 100_000);
    assert_eq!(call("cube", json!([3])), 27);
    assert_eq!(
        host.stats(Some("cubes")).unwrap()[0].hits,
        3,
        "still cached"
    );

    // Against a table that ends before cache_open (an older host), the same
    // calls fall back to finding the cache by name, and still work.
    assert_eq!(
        call("as_older_host", json!([41])),
        json!([42, false]),
        "answered by name, without touching the functions past the table's size"
    );
    let older = host.stats(Some("older")).unwrap()[0].clone();
    assert_eq!((older.inserts, older.hits), (1, 1), "{older:?}");

    // A reset (as `keepwarm reset handled` does) is seen through the handle.
    assert_eq!(host.reset("handled"), Some(3));
    assert_eq!(call("handled_get", json!([1])), Value::Null);
    assert_eq!(call("handled_get_with", json!([2])), Value::Null);
    assert_eq!(figures(&host).entries, 0);
}
