//! The foundation's user story, step by step, with the real cargo and the
//! real host: build, call, edit, rebuild, call, reset.

use keepwarm_tests::{HostProcess, Scratch};

#[test]
fn rebuild_keeps_square_cache_and_reset_square_recomputes() {
    // 1. The user's plugin: a copy of the example plugin, built by cargo.
    let plugin = Scratch::copy_of("example-plugin", "kw_story_plugin");
    let library = plugin.build();
    let host = HostProcess::start(&library, &[]);
    host.wait_for("generation 1 loaded");

    // 2. `call square 10` computes (and logs), the second call is a hit.
    assert_eq!(host.call("square", &["10"]), 100);
    host.wait_for("[gen 1] Squaring 10");
    assert_eq!(host.call("square", &["10"]), 100);
    assert_eq!(host.call("version", &[]), "v1");
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("Squaring 10", 1);
    assert_eq!(
        host.count("Squaring 10"),
        1,
        "the second call must be a hit"
    );

    // 3. Edit the code and rebuild with cargo while the host runs.
    plugin.edit(|src| {
        src.replace(
            r#"pub const VERSION: &str = "v1";"#,
            r#"pub const VERSION: &str = "v2";"#,
        )
    });
    plugin.build();

    // 4. The host reloads by itself, keeps the cache, and the new code answers.
    let line = host.wait_for("generation 2 reloaded");
    assert!(
        line.contains("caches kept") && line.contains("square (1)"),
        "{line}"
    );
    assert_eq!(host.call("version", &[]), "v2");
    assert_eq!(host.call("square", &["10"]), 100);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("Squaring 10", 1);
    assert_eq!(
        host.count("Squaring 10"),
        1,
        "square must still be cached after the reload"
    );
    let stats = host.stats();
    assert_eq!(stats["square"]["hits"], 2);
    assert_eq!(stats["square"]["misses"], 1);

    // 5. `keepwarm reset square` from another terminal; the next call computes.
    let out = host.cli(&["reset", "square"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(host.call("square", &["10"]), 100);
    host.wait_for("[gen 2] Squaring 10");
    let stats = host.stats();
    assert_eq!(stats["square"]["resets"], 1);
    assert_eq!(host.status()["generation"], 2);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("generation 2", 1);
    assert_eq!(
        host.count("generation 2"),
        1,
        "exactly one reload for one build"
    );
}

#[test]
fn fib_90_is_memoized_recursively() {
    let host = HostProcess::start(&keepwarm_tests::built_library("example-plugin"), &[]);
    assert_eq!(
        host.call("fib", &["90"]),
        serde_json::json!(2880067194370816120u64)
    );
    let fib = &host.stats()["fib"];
    assert_eq!(
        (fib["misses"].as_u64(), fib["entries"].as_u64()),
        (Some(91), Some(91))
    );
    assert_eq!(host.call("count_primes", &["1000000"]), 78498);
    assert_eq!(host.call("count_primes", &["100"]), 25);
    // Past u64: a clear error (exit 1), not a wrapped number or a panic.
    for (f, arg, says) in [
        ("fib", "94", "n must be at most 93"),
        ("square", "4294967296", "x must be below 2^32"),
    ] {
        let out = host.cli(&["call", f, arg]);
        assert_eq!(out.status, Some(1), "{out:?}");
        assert!(out.stderr.contains(says), "{out:?}");
    }
}

#[test]
fn cli_exit_statuses_follow_the_contract() {
    let host = HostProcess::start(&keepwarm_tests::built_library("example-plugin"), &[]);
    assert_eq!(host.cli(&["call", "square", "10"]).status, Some(0));
    let unknown = host.cli(&["call", "no_such_function"]);
    assert_eq!(unknown.status, Some(1));
    assert!(
        unknown.stderr.contains("no function `no_such_function`"),
        "{unknown:?}"
    );
    let bad_arg = host.cli(&["call", "square", "ten"]);
    assert_eq!(bad_arg.status, Some(1));
    assert!(bad_arg.stderr.contains("expected u64"), "{bad_arg:?}");
    assert_eq!(host.cli(&["reset", "no_such_cache"]).status, Some(1));
    assert_eq!(host.cli(&["reset"]).status, Some(2), "usage error");
    assert_eq!(host.cli(&["reset", "--all"]).status, Some(0));
    let status = host.status();
    for key in [
        "library",
        "generation",
        "functions",
        "last_error",
        "failed_reloads",
    ] {
        assert!(
            status.get(key).is_some(),
            "status --json lacks {key}: {status}"
        );
    }
    for (_, cache) in host.stats() {
        for key in [
            "name",
            "entries",
            "bytes",
            "capacity",
            "max_bytes",
            "hits",
            "misses",
            "inserts",
            "evictions",
            "resets",
        ] {
            assert!(
                cache.get(key).is_some(),
                "stats --json lacks {key}: {cache}"
            );
        }
    }
    // No host at the socket: exit status 3.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(keepwarm_tests::keepwarm_bin())
        .args(["--socket"])
        .arg(dir.path().join("nobody.sock"))
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn c_plugin_round_trips_through_host_cache() {
    let dir = tempfile::tempdir().unwrap();
    let library = keepwarm_tests::c_plugin(dir.path());
    let host = HostProcess::start(&library, &[]);
    host.wait_for("[gen 1] C plugin loaded");
    assert_eq!(host.call("recall", &[]), serde_json::Value::Null);
    assert_eq!(host.call("remember", &["42", "x"]), true);
    assert_eq!(host.call("recall", &[]), serde_json::json!([42, "x"]));
    // Through a handle: 10 bytes fit the plugin's 16-byte buffer (copied)...
    assert_eq!(host.call("recall_fast", &[]), serde_json::json!([42, "x"]));
    let memory = &host.stats()["c_memory"];
    assert_eq!(
        (
            memory["entries"].as_u64(),
            memory["hits"].as_u64(),
            memory["capacity"].as_u64()
        ),
        (Some(1), Some(2), Some(16))
    );
    // ...a longer value does not (lent, then released).
    let long = "x".repeat(100);
    assert_eq!(host.call("remember", &[&long]), true);
    assert_eq!(host.call("recall_fast", &[]), serde_json::json!([long]));
    assert_eq!(host.call("forget", &[]), true);
    assert_eq!(host.call("recall", &[]), serde_json::Value::Null);
    assert_eq!(host.call("recall_fast", &[]), serde_json::Value::Null);
}
