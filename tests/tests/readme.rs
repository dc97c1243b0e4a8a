//! The README's first screen is true (issue 16, row 11): every command in
//! it is run here, and its transcripts are what a real session prints —
//! the same lines, with only timings, hashes and the directories of paths
//! allowed to differ.
//!
//! How each command is run:
//! - `make run`: `make -n run` must say it builds the host and the example
//!   plugin and runs `./target/debug/keepwarm run` on it; the test then runs
//!   that binary on a copy of the example plugin in a pseudo-terminal and
//!   types the transcript's `keepwarm>` lines;
//! - `make test`: `make -n test` must run the workspace's tests (running
//!   it here would recurse; CI runs it);
//! - `cargo install --path host/cli`: run with `--root` in a temporary
//!   directory and `--debug` (the test's build is reused instead of a
//!   release build), then the installed `keepwarm --version`;
//! - `cargo build -p example-plugin`: run in the copy, after the edit the
//!   README asks for (`VERSION` becomes "v2");
//! - `./target/debug/keepwarm reset square`: run against the session's host.

use std::path::Path;
use std::process::{Command, Stdio};

use keepwarm_tests::{cargo, keepwarm_bin, root, scratch_target_dir, target_dir, Scratch};

/// The README up to its edit-loop section: what a new user reads first.
fn first_screen() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let end = readme
        .find("\n## The edit loop")
        .expect("an edit-loop section");
    readme[..end].to_owned()
}

/// The fenced blocks of `text`: (info string, body).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            out.push((info.trim().to_owned(), body.join("\n")));
        }
    }
    out
}

/// A line with what may differ between machines and runs made equal:
/// timings, the hash in a socket name, the directories of paths, and the
/// width of a table's columns.
fn normal(line: &str) -> String {
    // What the terminal shows of the line: after its last carriage
    // return, without escape sequences.
    let escape = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").unwrap();
    let line = escape.replace_all(line, "");
    let line = line.rsplit('\r').next().unwrap_or("");
    // The terminal redraws the prompt before the typed text.
    let line = line.strip_prefix("keepwarm> ").unwrap_or(line);
    let time = regex::Regex::new(r"\d+(\.\d+)? ?(ms|µs|ns|s)\b").unwrap();
    let hash = regex::Regex::new(r"-[0-9a-f]{8}\.sock").unwrap();
    let path = regex::Regex::new(r"(/[^\s/·]+)+/([^\s/]+)").unwrap();
    let line = time.replace_all(line.trim_end(), "TIME");
    let line = hash.replace_all(&line, "-HASH.sock");
    let line = path.replace_all(&line, "DIR/$2");
    // Column widths follow the widest timing.
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

const DRIVER: &str = r#"
binary, lib, script, build_dir, cargo_target = sys.argv[1:6]
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "run", lib])
read_until(b"keepwarm> ")
for step in script.split("\n"):
    kind, _, arg = step.partition(" ")
    if kind == "type":
        # Each new prompt turns bracketed paste on again: one per command.
        seen = out.count(b"\x1b[?2004h")
        os.write(fd, arg.encode() + b"\r")
        # The answer is in once the next prompt is drawn.
        end = time.time() + 120
        while out.count(b"\x1b[?2004h") <= seen or not out.endswith(b"\x1b[?2026l"):
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                out += os.read(fd, 65536)
            if time.time() > end:
                sys.stdout.write(out.decode(errors="replace"))
                raise SystemExit("timeout after %r" % arg)
    elif kind == "build":
        env = dict(os.environ, CARGO_TARGET_DIR=cargo_target)
        import subprocess
        subprocess.run(arg.split(), cwd=build_dir, env=env, check=True, capture_output=True)
        read_until(b"generation 2 reloaded")
        read_until(b"keepwarm> ")
os.write(fd, b"quit\r")
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;

#[test]
fn the_first_screen_of_the_readme_is_what_a_real_session_prints() {
    let screen = first_screen();
    let blocks = blocks(&screen);

    // Every shell command of the first screen, so that a new one fails
    // this test until it is run here too.
    let commands: Vec<String> = blocks
        .iter()
        .filter(|(info, _)| info == "sh")
        .flat_map(|(_, body)| body.lines().map(str::to_owned).collect::<Vec<_>>())
        .map(|l| l.split('#').next().unwrap().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        commands,
        [
            "make run",
            "make test",
            "cargo install --path host/cli",
            "cargo build -p example-plugin",
            "./target/debug/keepwarm reset square",
        ],
        "the README's first screen runs other commands: run them in this test"
    );

    // make run / make test: what they run.
    let make = |target: &str| {
        let out = Command::new("make")
            .args(["-n", target])
            .current_dir(root())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run = make("run");
    assert!(
        run.contains("build -p keepwarm-cli -p example-plugin")
            && run.contains("./target/debug/keepwarm run target/debug/libexample_plugin.so"),
        "make run: {run}"
    );
    let test = make("test");
    assert!(test.contains("test --workspace"), "make test: {test}");

    // cargo install --path host/cli: the installed binary runs.
    let install_root = tempfile::tempdir().unwrap();
    let out = cargo()
        .args([
            "install",
            "--path",
            "host/cli",
            "--debug",
            "--offline",
            "--quiet",
            "--root",
        ])
        .arg(install_root.path())
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = install_root.path().join("bin/keepwarm");
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("keepwarm "),
        "{version:?}"
    );

    // The session: a copy of the example plugin, edited and rebuilt as
    // the README says.
    let copy = Scratch::copy_of("example-plugin", "example-plugin");
    let lib = copy.build();
    let transcripts: Vec<&String> = blocks
        .iter()
        .filter(|(info, body)| info == "text" && body.contains("keepwarm> "))
        .map(|(_, body)| body)
        .collect();
    assert_eq!(
        transcripts.len(),
        2,
        "a session before and after the rebuild"
    );
    let typed = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.strip_prefix("keepwarm> "))
            .map(|c| format!("type {c}"))
            .collect()
    };
    let mut script = typed(transcripts[0]);
    copy.edit(|s| s.replace("VERSION: &str = \"v1\"", "VERSION: &str = \"v2\""));
    script.push("build cargo build -p example-plugin --offline".into());
    script.extend(typed(transcripts[1]));

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(keepwarm_tests::pty_python(DRIVER))
        .arg(keepwarm_bin())
        .arg(&lib)
        .arg(script.join("\n"))
        .arg(copy.dir())
        .arg(scratch_target_dir())
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("XDG_STATE_HOME", dir.path())
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let session = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    assert!(
        out.status.success(),
        "{}\n{session}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = session.lines().map(normal).collect();
    // Each transcript line appears in the session, in order.
    let mut at = 0;
    for block in &transcripts {
        for line in block.lines().filter(|l| !l.starts_with("$ ")) {
            let want = normal(line);
            match got[at..].iter().position(|g| g.ends_with(&want)) {
                Some(i) => at += i + 1,
                None => panic!(
                    "the README says {line:?}; the session printed, from there:\n{}",
                    got[at..].join("\n")
                ),
            }
        }
    }

    // ./target/debug/keepwarm reset square, from another terminal, while
    // a host runs: one entry dropped.
    let host = keepwarm_tests::HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    host.call("square", &["10"]);
    let out = Command::new(keepwarm_bin())
        .args(["reset", "square"])
        .env("KEEPWARM_SOCKET", host.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(host.stats()["square"]["entries"], 0);
    assert!(Path::new(&installed).exists());
}
