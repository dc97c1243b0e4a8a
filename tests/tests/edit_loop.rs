//! The edit loop with the real cargo: each build reloads exactly once, and
//! `keepwarm dev` builds, serves, rebuilds on edits and survives compile
//! errors.

use keepwarm_tests::{scratch_target_dir, HostProcess, Scratch};

#[test]
fn each_build_reloads_exactly_once() {
    let plugin = Scratch::copy_of("example-plugin", "kw_loop_plugin");
    let host = HostProcess::start(&plugin.build(), &[]);
    host.wait_for("generation 1 loaded");
    for n in 2..=4 {
        plugin.edit(|src| src.replace(&format!(r#""v{}""#, n - 1), &format!(r#""v{n}""#)));
        plugin.build();
        host.wait_for(&format!("generation {n} reloaded"));
        assert_eq!(host.call("version", &[]), format!("v{n}"));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("reloaded", 3);
    assert_eq!(
        host.count("reloaded"),
        3,
        "three builds, three reloads: {:?}",
        host.lines()
    );
    assert_eq!(host.count("refused"), 0);
}

#[test]
fn dev_rebuilds_on_edit_and_survives_a_compile_error() {
    let plugin = Scratch::copy_of("example-plugin", "kw_dev_plugin");
    let target = scratch_target_dir();
    let host = HostProcess::spawn(
        &["dev".into(), "--no-repl".into()],
        Some(plugin.dir()),
        &[("CARGO_TARGET_DIR", &target)],
    );
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("square", &["10"]), 100);
    assert_eq!(host.call("version", &[]), "v1");

    // Save an edit: dev rebuilds, the host reloads, the cache stays. The
    // edit adds a function that segfaults.
    plugin.edit(|src| {
        src.replace(r#""v1""#, r#""v2""#)
            + "\n#[export]\npub fn segv() -> u64 {\n    // SAFETY: none: address 16 is never mapped, the store faults.\n    unsafe { std::ptr::write_volatile(16 as *mut u64, 1) };\n    0\n}\n"
    });
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "v2");

    // `keepwarm dev` contains crashes as `run` does: the call fails, the
    // host restarts on the same build, the entry is still there.
    let dev = host.pid();
    let out = host.cli(&["call", "segv"]);
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("plugin crashed: SIGSEGV in segv() (generation 2)"),
        "{out:?}"
    );
    host.wait_for("restarted on generation 2 in ");
    assert_eq!(host.status()["pid"], dev, "the same dev process");
    assert_eq!(host.call("square", &["10"]), 100);

    // A compile error: shown, and generation 2 keeps serving.
    plugin.edit(|src| {
        src.replace(
            "pub fn version() -> &'static str {",
            "pub fn version() -> &'static str {\n    let broken: u64 = \"not a number\";",
        )
    });
    host.wait_for("error[E0308]");
    host.wait_for("cargo build failed");
    assert_eq!(host.call("version", &[]), "v2");
    assert_eq!(host.status()["generation"], 2);

    // Fixed: the next build loads.
    plugin.edit(|src| {
        src.replace("\n    let broken: u64 = \"not a number\";", "")
            .replace(r#""v2""#, r#""v3""#)
    });
    host.wait_for("generation 3 reloaded");
    assert_eq!(host.call("version", &[]), "v3");
    assert_eq!(host.call("square", &["10"]), 100);
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("Squaring 10", 1);
    assert_eq!(
        host.count("Squaring 10"),
        1,
        "square stayed cached through it all"
    );
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("reloaded", 2);
    assert_eq!(host.count("reloaded"), 2, "{:?}", host.lines());
}

/// `keepwarm dev --build-only` (what `make watch` falls back to) rebuilds
/// on edits and serves nothing, so it sits beside the host that serves the
/// library, which reloads each build (issue 16, row 10).
#[test]
fn dev_build_only_rebuilds_beside_a_serving_host() {
    use std::io::{BufRead, BufReader};
    let plugin = Scratch::copy_of("example-plugin", "kw_dev_build_only");
    let target = scratch_target_dir();
    let mut dev = std::process::Command::new(keepwarm_tests::keepwarm_bin())
        .args(["dev", "--build-only"])
        .current_dir(plugin.dir())
        .env("CARGO_TARGET_DIR", &target)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait = |needle: &str| loop {
        let line = lines
            .recv_timeout(keepwarm_tests::WAIT)
            .unwrap_or_else(|_| panic!("keepwarm dev never printed {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    };
    wait("rebuilding only");
    let host = HostProcess::start(&plugin.library(), &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("version", &[]), "v1");
    plugin.edit(|src| src.replace(r#""v1""#, r#""v2""#));
    wait("built in");
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "v2");
    assert_eq!(host.count("another keepwarm host"), 0);
    dev.kill().unwrap();
    dev.wait().unwrap();
}
