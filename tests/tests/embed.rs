//! The runtime as a library (issue 12): the embedding example
//! (`host/examples/embed.rs`) runs, makes typed calls, sees a reload and
//! ends clean.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use keepwarm_tests::{
    built_library, cargo, replace_atomically, root, shadow_dirs, target_dir, WAIT,
};

/// `host/examples/embed.rs`, built.
fn embed_example() -> std::path::PathBuf {
    let status = cargo()
        .current_dir(root())
        .args(["build", "--quiet", "-p", "keepwarm", "--example", "embed"])
        .status()
        .expect("running cargo build --example embed");
    assert!(status.success(), "cargo build --example embed failed");
    target_dir().join("debug/examples/embed")
}

#[test]
fn the_embedding_example_sees_a_reload_and_ends_clean() {
    let example = embed_example();
    let dir = tempfile::tempdir().unwrap();
    let xdg = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libswap.so");
    std::fs::copy(built_library("swap_a"), &lib).unwrap();
    let mut child = Command::new(example)
        .arg(&lib)
        .arg("1")
        .env("XDG_RUNTIME_DIR", xdg.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| loop {
        let line = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no {needle:?} in {seen:#?}"));
        seen.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    };
    wait_for("event: Loaded { generation: 1");
    wait_for("version() = a");
    assert_eq!(shadow_dirs(xdg.path()).len(), 1, "the host's shadow copy");
    replace_atomically(&built_library("swap_b"), &lib);
    wait_for("event: Loaded { generation: 2");
    wait_for("shut down");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        shadow_dirs(xdg.path()).is_empty(),
        "shutdown removed its files"
    );
}
