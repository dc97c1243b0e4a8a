//! Issue 11: a cached answer is never stale; a call after a build sees
//! that build.

use keepwarm_tests::{built_library, replace_atomically, HostProcess};

/// A copy of the example plugin with `code` added before its `plugin!`
/// line, under the package name `package`.
fn example_with(package: &str, code: &str) -> keepwarm_tests::Scratch {
    let plugin = keepwarm_tests::Scratch::copy_of("example-plugin", package);
    plugin.edit(|s| {
        s.replace(
            "keepwarm_api::plugin!",
            &format!("{code}\nkeepwarm_api::plugin!"),
        )
    });
    plugin
}

/// `cargo build && keepwarm call version` answers the new build, every
/// time, without waiting for the watcher.
#[test]
fn a_call_right_after_a_build_answers_that_build() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(built_library("swap_a"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    for round in 0..10 {
        let (package, version) = if round % 2 == 0 {
            ("swap_b", "b")
        } else {
            ("swap_a", "a")
        };
        replace_atomically(&built_library(package), &lib);
        let out = host.cli(&["call", "version"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        assert_eq!(out.stdout.trim(), format!("\"{version}\""), "round {round}");
        assert!(out.stderr.is_empty(), "{out:?}");
    }
    // A build that is refused: the old generation answers, and says so.
    let tmp = dir.path().join("broken.tmp");
    std::fs::write(&tmp, b"this is not a library\n").unwrap();
    std::fs::rename(&tmp, &lib).unwrap();
    let out = host.cli(&["call", "version"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "\"a\"",
        "the last good build (round 9: a)"
    );
    assert!(
        out.stderr.contains("the build on disk was not loaded")
            && out.stderr.contains("not a shared library"),
        "{out:?}"
    );
}

/// Concurrent memoized recursion without any cycle never reports one (a
/// woken waiter used to stay in the waits-for graph and close false cycles),
/// and two callers on one cold key count one miss and one hit.
#[test]
fn concurrent_memoized_recursion_has_no_false_cycles_and_honest_figures() {
    use keepwarm::{Config, Host};
    let host = Host::new(Config::new(built_library("faults"))).unwrap();
    host.reload(false).unwrap();
    const THREADS: u64 = 4;
    const CALLS: u64 = 25_000;
    let cycles = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (host, cycles) = (&host, &cycles);
            std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn_scoped(s, move || {
                    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for i in 0..CALLS {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = x % 300;
                        if i % 97 == 0 {
                            host.reset("depth"); // keep it cold
                        }
                        match host.call_json("depth", &[k.into()]) {
                            Ok(v) => assert_eq!(v, k),
                            Err(e) if e.to_string().contains("cycle") => {
                                cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => panic!("depth({k}): {e}"),
                        }
                    }
                })
                .unwrap();
        }
    });
    let cycles = cycles.into_inner();
    eprintln!(
        "{} calls by {THREADS} threads: {cycles} cycle errors",
        THREADS * CALLS
    );
    assert_eq!(cycles, 0);
    // A real cycle is still reported.
    let err = host.call_json("cycle", &[1.into()]).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
}

/// Adding `version = N`, or `reset_on_change`, to a plain `#[memo]`
/// together with a new body resets its cache: the old body's values are
/// never served (issue 11, rows 1 and 2).
#[test]
fn adding_version_or_reset_on_change_resets_the_cache() {
    use keepwarm_tests::Scratch;
    let plugin = Scratch::copy_of("example-plugin", "kw_trust_identity");
    let lib = plugin.build();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("square", &["10"]), 100);
    // A new body, and `version = 2` where there was none.
    plugin.edit(|s| {
        s.replace(
            "#[memo(max_entries = 100_000)]",
            "#[memo(max_entries = 100_000, version = 2)]",
        )
        .replace("x.checked_mul(x)", "x.checked_mul(x + 1)")
    });
    plugin.build();
    let line = host.wait_for("generation 2 reloaded");
    assert!(
        line.contains("reset because their code changed: square"),
        "{line}"
    );
    assert_eq!(host.call("square", &["10"]), 110, "the new body answers");
    // Back to x * x, `reset_on_change` instead of the version.
    plugin.edit(|s| {
        s.replace(
            "#[memo(max_entries = 100_000, version = 2)]",
            "#[memo(max_entries = 100_000, reset_on_change)]",
        )
        .replace("x.checked_mul(x + 1)", "x.checked_mul(x)")
    });
    plugin.build();
    let line = host.wait_for("generation 3 reloaded");
    assert!(
        line.contains("reset because their code changed: square"),
        "{line}"
    );
    assert_eq!(host.call("square", &["10"]), 100);
    // fib and count_primes did not change: kept.
    assert_eq!(host.stats()["fib"]["resets"], 0);
    // cargo replaces the library by removing it and linking the new one:
    // an instant without a file is not worth a "waiting for" line.
    assert_eq!(host.count("waiting for"), 0, "{:?}", host.lines());
}

/// Two `#[memo]` functions of one name in two modules would share one
/// cache and serve each other's values: the host refuses such a plugin and
/// says what to do (issue 11, row 4).
#[test]
fn two_memo_functions_of_one_name_are_refused() {
    use keepwarm_tests::Scratch;
    let plugin = Scratch::copy_of("example-plugin", "kw_trust_same_name");
    plugin.edit(|s| {
        s.replace(
            "keepwarm_api::plugin!",
            "mod plus {\n    #[keepwarm_api::memo]\n    pub fn calc(x: u64) -> u64 { x + x }\n}\n\
             mod times {\n    #[keepwarm_api::memo]\n    pub fn calc(x: u64) -> u64 { x * x }\n}\n\
             #[keepwarm_api::export]\npub fn both(x: u64) -> (u64, u64) { (plus::calc(x), times::calc(x)) }\n\n\
             keepwarm_api::plugin!",
        )
    });
    let lib = plugin.build();
    let host = HostProcess::start(&lib, &[]);
    let line = host.wait_for("refused");
    assert!(
        line.contains("the cache `calc` is declared by two different #[memo] functions"),
        "{line}"
    );
    assert_eq!(host.status()["generation"], 0);
}

/// `keepwarm run LIB --then FN`, the compiled `runfile`: FN's answer after
/// every successful load; a failing FN is reported and the host serves on
/// (issue 11, row 8).
#[test]
fn then_calls_its_function_after_every_load() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(built_library("swap_a"), &lib).unwrap();
    let host = HostProcess::start(&lib, &["--then", "version"]);
    host.wait_for("keepwarm: version() = \"a\"");
    replace_atomically(&built_library("swap_b"), &lib);
    host.wait_for("keepwarm: version() = \"b\"");
    let failing = HostProcess::start(&built_library("faults"), &["--then", "boom"]);
    let line = failing.wait_for("boom() failed");
    assert!(line.contains("keeps serving"), "{line}");
    assert_eq!(failing.call("ok", &["3"]), 3);
}

/// After a `reset_on_change` reload, a call still running on the old
/// generation cannot refill the reset cache with old-code values: its
/// stores are dropped and counted as `stale_puts` (issue 11, row 3).
#[test]
fn an_old_generation_cannot_refill_a_reset_cache() {
    use keepwarm_tests::Scratch;
    let plugin = Scratch::copy_of("example-plugin", "kw_trust_stale");
    plugin.edit(|s| {
        s + "\n#[memo(reset_on_change)]\nfn slow(n: u64) -> u64 {\n    \
             std::thread::sleep(std::time::Duration::from_millis(10));\n    n * 10\n}\n\n\
             #[export]\npub fn fill(k: u64) -> u64 {\n    (0..k).map(slow).sum()\n}\n"
    });
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1.so");
    std::fs::copy(plugin.build(), &v1).unwrap();
    plugin.edit(|s| s.replace("    n * 10\n", "    n * 20\n"));
    let v2 = dir.path().join("v2.so");
    std::fs::copy(plugin.build(), &v2).unwrap();

    let lib = dir.path().join("libplugin.so");
    std::fs::copy(&v1, &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    std::thread::scope(|s| {
        // 300 keys at 10 ms each: still running on generation 1 when
        // generation 2 lands.
        let old = s.spawn(|| host.call("fill", &["300"]));
        let deadline = std::time::Instant::now() + keepwarm_tests::WAIT;
        while host
            .stats()
            .get("slow")
            .is_none_or(|c| c["entries"].as_u64() < Some(20))
        {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        replace_atomically(&v2, &lib);
        let line = host.wait_for("generation 2 reloaded");
        assert!(
            line.contains("reset because their code changed: slow"),
            "{line}"
        );
        // The old call finishes with old values (it is old code).
        assert_eq!(old.join().unwrap(), 10 * 44_850);
    });
    let slow = &host.stats()["slow"];
    assert!(slow["stale_puts"].as_u64().unwrap() > 0, "{slow}");
    // Every value the new generation sees is its own: 20 n, never 10 n.
    assert_eq!(host.call("fill", &["300"]), 20 * 44_850);
}

/// A memoized failure is not remembered: `Err` from a `Result` function,
/// and `None` from a `#[memo(option)]` function, are computed again once
/// the condition is gone (issue 11, row 6).
#[test]
fn failures_are_not_cached() {
    use keepwarm_tests::Scratch;
    let plugin = Scratch::copy_of("example-plugin", "kw_trust_failures");
    plugin.edit(|s| {
        s + "\nfn ready() -> bool {\n    \
             std::env::var_os(\"KW_TEST_FLAG\").is_some_and(|f| std::path::Path::new(&f).exists())\n}\n\n\
             #[export]\n#[memo]\npub fn flaky(x: u64) -> Result<u64, String> {\n    \
             if ready() { Ok(x) } else { Err(\"not ready\".into()) }\n}\n\n\
             #[export]\n#[memo(option)]\npub fn maybe(x: u64) -> Option<u64> {\n    ready().then_some(x)\n}\n"
    });
    let lib = plugin.build();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let host = HostProcess::spawn(
        &["run".into(), lib.into(), "--no-repl".into()],
        None,
        &[("KW_TEST_FLAG", &flag)],
    );
    host.wait_for("generation 1 loaded");
    let failed = host.cli(&["call", "flaky", "7"]);
    assert_eq!(failed.status, Some(1), "{failed:?}");
    assert!(failed.stderr.contains("not ready"), "{failed:?}");
    assert_eq!(host.call("maybe", &["7"]), serde_json::Value::Null);
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(host.call("flaky", &["7"]), 7, "the Err was not cached");
    assert_eq!(host.call("maybe", &["7"]), 7, "the None was not cached");
    // Successes are cached as before.
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(host.call("flaky", &["7"]), 7);
    assert_eq!(host.stats()["flaky"]["inserts"], 1);
}

/// Integers beyond 64 bits go through `keepwarm call` and the protocol
/// exactly, in arguments and in results: fib(100) is not rounded to a
/// float, u128::MAX and i128::MIN come back as they went (issue 11, row 9).
#[test]
fn integers_beyond_64_bits_go_through_exactly() {
    let plugin = example_with(
        "kw_trust_wide",
        r#"
#[export]
#[memo]
pub fn fib_wide(n: u32) -> u128 {
    if n < 2 { n as u128 } else { fib_wide(n - 1) + fib_wide(n - 2) }
}
#[export]
pub fn echo_u128(x: u128) -> u128 { x }
#[export]
pub fn echo_i128(x: i128) -> i128 { x }
#[export]
pub fn echo_u64(x: u64) -> u64 { x }
#[export]
pub fn halve(x: f64) -> f64 { x / 2.0 }
"#,
    );
    let lib = plugin.build();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    let call = |args: &[&str]| {
        let mut all = vec!["call"];
        all.extend_from_slice(args);
        let out = host.cli(&all);
        assert_eq!(out.status, Some(0), "{out:?}");
        out.stdout.trim().to_owned()
    };
    assert_eq!(call(&["fib_wide", "100"]), "354224848179261915075");
    assert_eq!(
        call(&["fib_wide", "150"]),
        "9969216677189303386214405760200"
    );
    let u128_max = u128::MAX.to_string();
    assert_eq!(call(&["echo_u128", &u128_max]), u128_max);
    let two_70 = (1u128 << 70).to_string();
    assert_eq!(call(&["echo_u128", &two_70]), two_70);
    let i128_min = i128::MIN.to_string();
    assert_eq!(call(&["echo_i128", &i128_min]), i128_min);
    let u64_max = u64::MAX.to_string();
    assert_eq!(call(&["echo_u64", &u64_max]), u64_max);
    assert_eq!(call(&["halve", "0.3"]), "0.15");
    // The cached value is the exact one too (a hit, not a recomputation).
    assert_eq!(call(&["fib_wide", "100"]), "354224848179261915075");
    assert!(host.stats()["fib_wide"]["hits"].as_u64().unwrap() >= 1);
    // What does not fit is still refused, with the argument named.
    let out = host.cli(&["call", "echo_u64", &two_70]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("argument 1"), "{out:?}");
    let out = host.cli(&["call", "echo_u128", "1.5"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.stderr.contains("argument 1 (1.5)"), "{out:?}");
}

/// A memoized struct whose two same-typed fields swap places, and a return
/// type that changes (u32 -> i64), are recomputed after the rebuild: the
/// entry's shape tag (the type's full structure) differs, so it is a miss
/// counted as `shape_mismatch`, never a hit decoded into the wrong fields
/// (issue 11, rows 5 and 10).
#[test]
fn a_value_of_another_shape_is_never_served() {
    use keepwarm_tests::Scratch;
    let plugin = Scratch::copy_of("example-plugin", "kw_trust_shape");
    plugin.add_dependency("serde", r#"{ version = "1", features = ["derive"] }"#);
    plugin.edit(|s| {
        s.replace(
            "keepwarm_api::plugin!",
            r#"
#[derive(serde::Serialize, serde::Deserialize)]
pub struct P { pub a: u32, pub b: u32 }

#[export]
#[memo]
pub fn pair(x: u32) -> P {
    log!("pair({x}) computed");
    P { a: x, b: x * 10 }
}

#[export]
#[memo]
pub fn widen(x: u32) -> u32 {
    log!("widen({x}) computed");
    x + 1
}

keepwarm_api::plugin!"#,
        )
    });
    let lib = plugin.build();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    let out = host.cli(&["call", "pair", "3"]);
    assert_eq!(out.json(), serde_json::json!({"a": 3, "b": 30}), "{out:?}");
    assert_eq!(host.call("widen", &["4"]), 5);
    // Warm: hits.
    host.cli(&["call", "pair", "3"]);
    host.call("widen", &["4"]);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("pair(3) computed", 1);
    assert_eq!(host.count("pair(3) computed"), 1);
    let before = host.stats();
    assert_eq!(before["pair"]["hits"], 1);
    assert_eq!(before["pair"]["shape_mismatch"], 0);

    // Swap the fields (same names, same types, same body), and widen the
    // return type with a new body (a plain #[memo] keeps entries across body
    // edits, but not across a change of what its values are).
    plugin.edit(|s| {
        s.replace(
            "pub struct P { pub a: u32, pub b: u32 }",
            "pub struct P { pub b: u32, pub a: u32 }",
        )
        .replace(
            "pub fn widen(x: u32) -> u32 {",
            "pub fn widen(x: u32) -> i64 {",
        )
        .replace("    x + 1\n", "    i64::from(x) + 2\n")
    });
    plugin.build();
    host.wait_for("generation 2 reloaded");
    let out = host.cli(&["call", "pair", "3"]);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(
        out.json(),
        serde_json::json!({"a": 3, "b": 30}),
        "the old entry must not decode into swapped fields: {out:?}"
    );
    assert_eq!(host.call("widen", &["4"]), 6, "recomputed by the new body");
    host.wait_for_nth("pair(3) computed", 2);
    let after = host.stats();
    assert_eq!(after["pair"]["hits"], 1, "a mismatch is not a hit");
    assert_eq!(after["pair"]["shape_mismatch"], 1);
    assert_eq!(after["widen"]["shape_mismatch"], 1);
    // The new value replaced the old one: the next call is a plain hit.
    host.cli(&["call", "pair", "3"]);
    let last = host.stats();
    assert_eq!(last["pair"]["hits"], 2);
    assert_eq!(last["pair"]["shape_mismatch"], 1);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("pair(3) computed", 2);
    assert_eq!(host.count("pair(3) computed"), 2);
}

/// `#[memo(ttl = SECONDS)]` entries expire (a miss counted as `expired`),
/// and `#[memo(key = EXPR)]` / `key = "Type", convert = "EXPR"` cache by a
/// projection of the arguments (what `#[cached]` users expect).
#[test]
fn memo_ttl_and_custom_keys() {
    let plugin = example_with(
        "kw_trust_options",
        r#"
#[export]
#[memo(ttl = 1)]
pub fn stamp(x: u64) -> u64 {
    log!("stamp({x}) computed");
    x
}

#[export]
#[memo(key = x / 10)]
pub fn decade(x: u64) -> u64 {
    log!("decade({x}) computed");
    x / 10 * 10
}

#[export]
#[memo(key = "String", convert = "{ word.to_lowercase() }")]
pub fn shout(word: String) -> String {
    log!("shout({word}) computed");
    word.to_uppercase()
}
"#,
    );
    let lib = plugin.build();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("stamp", &["7"]), 7);
    assert_eq!(host.call("stamp", &["7"]), 7);
    assert_eq!(host.stats()["stamp"]["hits"], 1);
    // The behaviour under test is time: let the entry outlive its second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(host.call("stamp", &["7"]), 7);
    host.wait_for_nth("stamp(7) computed", 2);
    let stats = host.stats();
    assert_eq!(stats["stamp"]["expired"], 1);
    assert_eq!(stats["stamp"]["misses"], 2);
    assert_eq!(stats["stamp"]["hits"], 1);

    assert_eq!(host.call("decade", &["15"]), 10);
    assert_eq!(
        host.call("decade", &["17"]),
        10,
        "same key: 17 / 10 == 15 / 10"
    );
    assert_eq!(host.call("decade", &["23"]), 20);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("decade(", 2);
    assert_eq!(host.count("decade("), 2, "{:?}", host.lines());
    assert_eq!(host.stats()["decade"]["hits"], 1);
    // `keepwarm stats FN`: the function's cache_info() (hits, misses,
    // maxsize = capacity, currsize = entries).
    let info = host.cli(&["stats", "decade", "--json"]).json();
    let info = &info.as_array().unwrap()[0];
    assert_eq!(
        (
            &info["hits"],
            &info["misses"],
            &info["entries"],
            &info["capacity"]
        ),
        (&1.into(), &2.into(), &2.into(), &100_000.into()),
        "{info}"
    );
    let table = host.cli(&["stats", "decade"]).stdout;
    assert!(
        table.lines().count() == 2 && table.contains("decade"),
        "{table}"
    );

    let out = host.cli(&["call", "shout", "Hello"]);
    assert_eq!(out.stdout.trim(), "\"HELLO\"", "{out:?}");
    let out = host.cli(&["call", "shout", "hELLO"]);
    assert_eq!(out.stdout.trim(), "\"HELLO\"", "{out:?}");
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("shout(", 1);
    assert_eq!(host.count("shout("), 1);
}
