//! Several plugins in one host (issue 12): `keepwarm run A.so B.so` loads
//! and watches both, they share the host's caches, a call finds its
//! function in the one plugin that exports it or asks for `PLUGIN::FN`, and
//! `status` lists each plugin with its generation.

use keepwarm_tests::{built_library, replace_atomically, HostProcess};

#[test]
fn two_plugins_share_a_host_and_reload_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let swap = dir.path().join("libswap.so");
    let example = dir.path().join("libexample.so");
    std::fs::copy(built_library("swap_a"), &swap).unwrap();
    std::fs::copy(built_library("example-plugin"), &example).unwrap();
    let host = HostProcess::start(&swap, &[example.to_str().unwrap()]);
    host.wait_for("loaded in");
    host.wait_for_nth("generation 1 loaded", 2);

    // A function only one plugin exports: found there.
    assert_eq!(host.call("square", &["12"]), 144);
    // One both export: the CLI says which to choose, and exits 1.
    let out = host.cli(&["call", "version"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("swap::version") && out.stderr.contains("example::version"),
        "{out:?}"
    );
    let out = host.cli(&["call", "swap::version"]);
    assert_eq!(out.stdout.trim(), "\"a\"", "{out:?}");
    let out = host.cli(&["call", "example::version"]);
    assert_eq!(out.stdout.trim(), "\"v1\"", "{out:?}");

    // status lists both, each with its generation.
    let status = host.cli(&["status", "--json"]).json();
    let plugins = status["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2, "{status}");
    assert_eq!(plugins[0]["plugin"], "swap");
    assert_eq!(plugins[1]["plugin"], "example");
    assert!(
        status["functions"]
            .as_array()
            .unwrap()
            .contains(&"swap::version".into()),
        "{status}"
    );

    // A rebuild of one plugin reloads that one only; the shared caches stay.
    replace_atomically(&built_library("swap_b"), &swap);
    host.wait_for("generation 2 reloaded");
    let out = host.cli(&["call", "swap::version"]);
    assert_eq!(out.stdout.trim(), "\"b\"", "{out:?}");
    let status = host.cli(&["status", "--json"]).json();
    assert_eq!(status["plugins"][0]["generation"], 2, "{status}");
    assert_eq!(status["plugins"][1]["generation"], 1, "{status}");
    assert_eq!(host.call("square", &["12"]), 144);
    let stats = host.stats();
    assert_eq!(
        stats["square"]["hits"], 1,
        "the entry survived the other's reload"
    );
    // The human status names both libraries.
    let text = host.cli(&["status"]).stdout;
    assert!(
        text.contains("libswap.so") && text.contains("libexample.so"),
        "{text}"
    );
}
