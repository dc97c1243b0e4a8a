//! The daily loop (issue 16, rows 2–5): JSON with spaces at the prompt is
//! one argument (`prompt.rs`), options after the function name are options,
//! `reset` without a cache names `--all`, and a misspelt library or a crate
//! directory gets a "did you mean".

use std::process::Command;

use keepwarm_tests::{built_library, keepwarm_bin, root, target_dir, HostProcess};

fn keepwarm(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(keepwarm_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", tempfile::tempdir().unwrap().path())
        // Where this run's builds are, as a user's environment would say.
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn options_after_the_function_name_are_options_not_arguments() {
    let host = HostProcess::start(&built_library("example-plugin"), &[]);
    host.wait_for("generation 1 loaded");
    let socket = host.socket().to_str().unwrap().to_owned();
    // --socket after the arguments is honoured.
    let (status, stdout, stderr) = keepwarm(&["call", "square", "3", "--socket", &socket]);
    assert_eq!((status, stdout.trim()), (Some(0), "9"), "{stderr}");
    // An unknown option is a usage error, not an argument.
    let (status, _, stderr) = keepwarm(&["call", "square", "3", "--bogus", "--socket", &socket]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
    // After `--` a dash-word is an argument (square then refuses it).
    let (status, _, stderr) = keepwarm(&["--socket", &socket, "call", "square", "--", "--x"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("argument 1 (\"--x\")"), "{stderr}");
    // Negative numbers are arguments.
    let (status, _, stderr) = keepwarm(&["--socket", &socket, "call", "square", "-3"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("argument 1 (-3)"), "{stderr}");
}

#[test]
fn reset_without_a_cache_names_all() {
    let (status, _, stderr) = keepwarm(&["reset"]);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("keepwarm reset --all"), "{stderr}");
}

#[test]
fn a_misspelt_library_or_a_crate_directory_gets_a_suggestion() {
    let built = built_library("example-plugin");
    let misspelt = built.with_file_name("libexample-plugin.so");
    let (status, _, stderr) = keepwarm(&["run", misspelt.to_str().unwrap(), "--no-repl"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("no such file")
            && stderr.contains(&format!("did you mean {}", built.display())),
        "{stderr}"
    );
    let crate_dir = root().join("example-plugin");
    let (status, _, stderr) = keepwarm(&["run", crate_dir.to_str().unwrap(), "--no-repl"]);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("is a directory")
            && stderr.contains(&format!("did you mean {}", built.display())),
        "{stderr}"
    );
}

/// `keepwarm dev` at the root of a workspace with several `cdylib` packages
/// refuses at once and lists them, instead of building one of its own
/// choosing (issue 16, row 1).
#[test]
fn dev_at_a_workspace_root_with_several_cdylibs_asks_for_one() {
    let out = Command::new(keepwarm_bin())
        .args(["dev", "--no-repl"])
        .current_dir(root())
        .env("XDG_RUNTIME_DIR", tempfile::tempdir().unwrap().path())
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("several cdylib packages: ")
            && stderr.contains("example-plugin")
            && stderr.contains("swap_a")
            && stderr.contains("pass -p NAME"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("building"), "nothing was built: {stdout}");
}
