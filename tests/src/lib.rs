//! `keepwarm-tests`: the harness of keepwarm's end-to-end tests.
//!
//! The tests in `tests/tests/` drive the real `keepwarm` binary on real
//! plugins built by the real cargo. This crate gives them:
//! - [`build_all`]: one `cargo build` of the host, the example plugin and
//!   every fixture crate, run once per test process, into the shared target
//!   directory;
//! - [`Scratch`]: a copy of a plugin crate in a temporary directory, to edit
//!   and rebuild while a host runs on it;
//! - [`HostProcess`]: a running `keepwarm run` with its own runtime
//!   directory and socket, whose output lines can be awaited, and
//!   [`HostProcess::cli`] to run the client subcommands against it;
//! - [`c_plugin`]: the C fixture compiled with `cc` against `keepwarm.h`.
//!
//! ```no_run
//! let lib = keepwarm_tests::built_library("example-plugin");
//! let host = keepwarm_tests::HostProcess::start(&lib, &[]);
//! assert_eq!(host.cli(&["call", "square", "10"]).stdout.trim(), "100");
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How long a test waits for an expected host line by default. Generous: CI
/// machines are shared and slow; a passing run never waits this long.
pub const WAIT: Duration = Duration::from_secs(60);

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The one target directory every build made by the tests shares:
/// `e2e/` inside cargo's target directory.
///
/// It is kept apart from the directory `cargo test` itself builds in: a
/// nested `cargo build -p example-plugin` resolves features differently
/// from `cargo test --workspace` and would overwrite the example plugin's
/// rlib under the running doc tests.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root().join(p) })
        .unwrap_or_else(|| root().join("target"))
        .join("e2e")
}

/// A `cargo` command (the one running the tests, when known).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.env("CARGO_TARGET_DIR", target_dir());
    c
}

/// The package names of the Rust fixture crates under `tests/fixtures`.
pub fn fixture_packages() -> Vec<String> {
    let mut names = Vec::new();
    let Ok(entries) = std::fs::read_dir(root().join("tests/fixtures")) else {
        return names;
    };
    for entry in entries.flatten() {
        let manifest = entry.path().join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(manifest) {
            if let Some(name) = text.lines().find_map(|l| {
                l.strip_prefix("name = ")
                    .map(|n| n.trim_matches('"').to_owned())
            }) {
                names.push(name);
            }
        }
    }
    names.sort();
    names
}

/// Builds the host, the example plugins and every fixture, once per process.
pub fn build_all() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = cargo();
        cmd.current_dir(root()).args([
            "build",
            "--quiet",
            "-p",
            "keepwarm-cli",
            "-p",
            "example-plugin",
            "-p",
            "raw-abi-plugin",
        ]);
        for name in fixture_packages() {
            cmd.args(["-p", &name]);
        }
        let status = cmd.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build of the host and fixtures failed"
        );
    });
}

/// Builds `package` with `--release` (for benchmarks: an unoptimized plugin
/// would measure debug code) and returns its library.
pub fn built_release_library(package: &str) -> PathBuf {
    let status = cargo()
        .current_dir(root())
        .args(["build", "--quiet", "--release", "-p", package])
        .status()
        .expect("running cargo build --release");
    assert!(
        status.success(),
        "cargo build --release -p {package} failed"
    );
    target_dir()
        .join("release")
        .join(format!("lib{}.so", package.replace('-', "_")))
}

/// The `keepwarm` binary (built by [`build_all`]).
pub fn keepwarm_bin() -> PathBuf {
    build_all();
    target_dir().join("debug/keepwarm")
}

/// The shared library of a workspace package (built by [`build_all`]).
pub fn built_library(package: &str) -> PathBuf {
    build_all();
    library_path(package)
}

/// Where cargo puts the `cdylib` of `package` in the shared target directory.
pub fn library_path(package: &str) -> PathBuf {
    target_dir()
        .join("debug")
        .join(format!("lib{}.so", package.replace('-', "_")))
}

/// The C fixture (`tests/fixtures/c_plugin/plugin.c`) compiled with `cc`
/// against `plugin-api/include/keepwarm.h`, with warnings as errors.
pub fn c_plugin(dir: &Path) -> PathBuf {
    let out = dir.join("libc_plugin.so");
    let status = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-I",
        ])
        .arg(root().join("plugin-api/include"))
        .arg(root().join("tests/fixtures/c_plugin/plugin.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running cc");
    assert!(
        status.success(),
        "cc failed to compile the C plugin against keepwarm.h"
    );
    out
}

/// The target directory of scratch crates: one for all of them, so their
/// dependencies compile once per run.
pub fn scratch_target_dir() -> PathBuf {
    target_dir().join("scratch")
}

/// A copy of a plugin crate in a temporary directory, with its own package
/// name, built into [`scratch_target_dir`].
pub struct Scratch {
    dir: tempfile::TempDir,
    package: String,
}

impl Scratch {
    /// Copies the crate at `source` (relative to the workspace root, e.g.
    /// `example-plugin`) under the new package name `package` (unique per test).
    pub fn copy_of(source: &str, package: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let from = root().join(source);
        copy_dir(&from.join("src"), &dir.path().join("src"));
        let manifest = std::fs::read_to_string(from.join("Cargo.toml")).unwrap();
        let mut doc: toml_edit::DocumentMut =
            manifest.parse().expect("the crate's Cargo.toml parses");
        let pkg = doc["package"].as_table_mut().expect("a [package] table");
        pkg.insert("name", toml_edit::value(package));
        // Outside the workspace: no inherited fields.
        pkg.insert("version", toml_edit::value("0.1.0"));
        pkg.insert("edition", toml_edit::value("2021"));
        for inherited in ["license", "repository", "rust-version"] {
            pkg.remove(inherited);
        }
        let api = root().join("plugin-api");
        let mut dep = toml_edit::InlineTable::new();
        dep.insert("path", api.display().to_string().into());
        doc["dependencies"]["keepwarm-api"] = toml_edit::value(dep);
        doc["workspace"] = toml_edit::table();
        std::fs::write(dir.path().join("Cargo.toml"), doc.to_string()).unwrap();
        // The workspace's lock file pins the same dependency versions, so the
        // shared target directory's artifacts are reused.
        let _ = std::fs::copy(root().join("Cargo.lock"), dir.path().join("Cargo.lock"));
        Scratch {
            dir,
            package: package.to_owned(),
        }
    }

    /// Adds `[dependencies] NAME = SPEC` (SPEC in TOML, e.g.
    /// `{ version = "1", features = ["derive"] }`) to the copy's manifest.
    pub fn add_dependency(&self, name: &str, spec: &str) {
        let path = self.dir.path().join("Cargo.toml");
        let mut doc: toml_edit::DocumentMut =
            std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let value: toml_edit::Value = spec.parse().expect("a TOML value");
        doc["dependencies"][name] = toml_edit::Item::Value(value);
        std::fs::write(path, doc.to_string()).unwrap();
    }

    /// The crate's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites `src/lib.rs` with `edit`.
    pub fn edit(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("src/lib.rs");
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = edit(text.clone());
        assert_ne!(text, edited, "the edit changed nothing");
        std::fs::write(path, edited).unwrap();
    }

    /// `cargo build` of the copy; returns the library's path.
    pub fn build(&self) -> PathBuf {
        let output = cargo()
            .env("CARGO_TARGET_DIR", scratch_target_dir())
            .current_dir(self.dir.path())
            .args(["build", "--quiet", "--offline"])
            .output()
            .expect("running cargo build");
        assert!(
            output.status.success(),
            "cargo build of {} failed:\n{}",
            self.package,
            String::from_utf8_lossy(&output.stderr)
        );
        self.library()
    }

    /// Where the built library lands.
    pub fn library(&self) -> PathBuf {
        scratch_target_dir()
            .join("debug")
            .join(format!("lib{}.so", self.package.replace('-', "_")))
    }
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What a client subcommand printed and its exit status.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit status (`None` if killed by a signal).
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Standard output parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running `keepwarm run LIB --no-repl`, with a private runtime directory
/// and socket; killed when dropped.
pub struct HostProcess {
    child: Child,
    lines: Arc<Lines>,
    socket: PathBuf,
    runtime: tempfile::TempDir,
}

impl HostProcess {
    /// Starts a host on `library` with extra `run` arguments, and waits until
    /// its control socket answers.
    pub fn start(library: &Path, extra: &[&str]) -> HostProcess {
        let mut args: Vec<std::ffi::OsString> =
            vec!["run".into(), library.into(), "--no-repl".into()];
        args.extend(extra.iter().map(Into::into));
        HostProcess::spawn(&args, None, &[])
    }

    /// Runs `keepwarm ARGS... --socket SOCKET` (in `dir`, with `env` added) and
    /// waits until its control socket answers. `run` and `dev` both serve.
    pub fn spawn(
        args: &[std::ffi::OsString],
        dir: Option<&Path>,
        env: &[(&str, &Path)],
    ) -> HostProcess {
        let runtime = tempfile::tempdir().unwrap();
        let socket = runtime.path().join("host.sock");
        let mut command = Command::new(keepwarm_bin());
        command
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting keepwarm");
        let lines = Arc::new(Lines {
            lines: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        });
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("KEEPWARM_TEST_ECHO").is_some() {
                        eprintln!("host| {line}");
                    }
                    lines.lines.lock().push(line);
                    lines.changed.notify_all();
                }
            });
        }
        let mut host = HostProcess {
            child,
            lines,
            socket,
            runtime,
        };
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&host.socket).is_err() {
            assert!(
                Instant::now() < deadline && host.is_running(),
                "the host never opened its socket: {:?}",
                host.lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        host
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The private runtime directory (`XDG_RUNTIME_DIR` of the host).
    pub fn runtime_dir(&self) -> &Path {
        self.runtime.path()
    }

    /// The host's process id (the supervisor: the process the test started).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id of the supervisor's worker, the process that loads
    /// the plugins (its maps, its memory, its CPU time).
    pub fn worker_pid(&self) -> u32 {
        self.status()["worker_pid"]
            .as_u64()
            .expect("status has worker_pid") as u32
    }

    /// Every line the host printed so far (stdout and stderr).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lines.lock().clone()
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lines
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` lines contain `needle`; returns the n-th. Panics with
    /// the host's output after [`WAIT`].
    pub fn wait_for_nth(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.lines.lines.lock();
        loop {
            if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return line.clone();
            }
            if self
                .lines
                .changed
                .wait_until(&mut lines, deadline)
                .timed_out()
            {
                panic!(
                    "no line #{n} containing {needle:?} within {WAIT:?}; the host printed:\n{}",
                    lines.join("\n")
                );
            }
        }
    }

    /// Waits for the first line containing `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_nth(needle, 1)
    }

    /// Runs `keepwarm --socket SOCKET ARGS...` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let output = Command::new(keepwarm_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .output()
            .expect("running keepwarm");
        CliOutput {
            status: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `keepwarm call FUNCTION ARGS...`, asserting success; returns the JSON.
    pub fn call(&self, function: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["call", function];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert_eq!(
            out.status,
            Some(0),
            "keepwarm call {function} {args:?} failed: {out:?}"
        );
        out.json()
    }

    /// `keepwarm stats --json`, by cache name.
    pub fn stats(&self) -> HashMap<String, serde_json::Value> {
        let out = self.cli(&["stats", "--json"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        out.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone()))
            .collect()
    }

    /// `keepwarm status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert_eq!(out.status, Some(0), "{out:?}");
        out.json()
    }

    /// Sends `signal` to the host and waits for it to exit. SIGKILL kills
    /// its worker too, at once: the whole host dies, as in a crash (the
    /// supervisor killed alone would have its worker stop cleanly, a moment
    /// later).
    pub fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        let workers = if signal == libc::SIGKILL {
            self.stop_and_kill_workers()
        } else {
            Vec::new()
        };
        // SAFETY: kill(2) on the child's pid; no memory involved.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = self.child.wait().expect("waiting for the host");
        for w in workers {
            wait_until_dead(w);
        }
        status
    }

    /// Stops the supervisor (SIGSTOP: it cannot start another worker) and
    /// kills its workers; returns them. The caller kills the supervisor.
    fn stop_and_kill_workers(&mut self) -> Vec<u32> {
        // Only a child still running (a reaped one's pid may be reused).
        if !matches!(self.child.try_wait(), Ok(None)) {
            return Vec::new();
        }
        // SAFETY: kill(2) on our own child; no memory involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
        let workers = children_of(self.child.id());
        for w in &workers {
            // SAFETY: kill(2) on a child of our child; no memory involved.
            unsafe { libc::kill(*w as i32, libc::SIGKILL) };
        }
        workers
    }

    /// A connection to the control socket, for many requests in a row.
    pub fn connect(&self) -> Connection {
        Connection::to(&self.socket)
    }

    /// Whether the host process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The children of process `pid` (a supervisor's worker), from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

impl Drop for HostProcess {
    /// Kills the host at once, as SIGKILL does to a process the user kills,
    /// and its worker with it (a supervisor's worker would otherwise stop
    /// cleanly on its own, while the next test step already runs).
    fn drop(&mut self) {
        let workers = self.stop_and_kill_workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            wait_until_dead(w);
        }
    }
}

/// Waits (10 s at most) until process `pid` is gone or a zombie (dead,
/// reparented to init until it is reaped).
pub fn wait_until_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One connection to a host's control socket: a request per line, an
/// answer per line.
pub struct Connection {
    writer: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Connection {
    /// Connects to the socket at `path`.
    pub fn to(path: &Path) -> Connection {
        let writer = std::os::unix::net::UnixStream::connect(path).expect("connecting");
        let reader = BufReader::new(writer.try_clone().unwrap());
        Connection { writer, reader }
    }

    /// Sends `request`; its response, or `None` when the host is gone.
    pub fn request(&mut self, request: &serde_json::Value) -> Option<serde_json::Value> {
        use std::io::Write;
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).ok()?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(n) if n > 0 => serde_json::from_str(&answer).ok(),
            _ => None,
        }
    }

    /// Calls `function` with `args`; the response.
    pub fn call(&mut self, function: &str, args: serde_json::Value) -> Option<serde_json::Value> {
        self.request(
            &serde_json::json!({"v": 1, "cmd": "call", "function": function, "args": args}),
        )
    }
}

/// Replaces the file at `to` with `from` the way cargo does: write a
/// temporary file beside it, then rename it over the target (atomic).
pub fn replace_atomically(from: &Path, to: &Path) {
    let tmp = to.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Waits until `f` holds, for up to a minute.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The shadow directories in a runtime directory (`RUNTIME/keepwarm/shadow-*`).
pub fn shadow_dirs(xdg: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(xdg.join("keepwarm")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shadow-"))
        .map(|e| e.path())
        .collect()
}

/// A small tmpfs mounted for a test (root only: `None` elsewhere, and the
/// test says SKIPPED); unmounted on drop.
pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on a new temporary directory.
    pub fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A python3 script driving a program in a pseudo-terminal: `body`, after
/// the imports and a `read_until(marker)` that reads the terminal `fd`
/// into `out` until `marker` shows (failing after two minutes with what
/// the terminal showed). `body` forks the terminal (`pid, fd =
/// pty.fork()`) before it reads.
pub fn pty_python(body: &str) -> String {
    const PRELUDE: &str = r#"
import os, pty, select, signal, sys, time
out = b""
def read_until(marker):
    global out
    end = time.time() + 120
    while marker not in out:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
        if time.time() > end:
            sys.stdout.write(out.decode(errors="replace"))
            raise SystemExit("timeout waiting for %r" % marker)
"#;
    format!("{PRELUDE}{body}")
}

/// Runs `driver` ([`pty_python`]) with the arguments `keepwarm run` needs
/// (the binary, `library`, a socket in `dir`), the runtime directory in
/// `dir`; asserts that it succeeded and returns what the terminal showed.
pub fn prompt_session(driver: &str, library: &Path, dir: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(pty_python(driver))
        .arg(keepwarm_bin())
        .arg(library)
        .arg(dir.join("prompt.sock"))
        .env("XDG_RUNTIME_DIR", dir)
        .env("XDG_STATE_HOME", dir)
        .env("TERM", "xterm")
        .output()
        .expect("python3");
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{screen}",
        String::from_utf8_lossy(&out.stderr)
    );
    screen
}

/// A real `redis-server` for the shared tier's tests (issue 17): the
/// Debian package's binary on 127.0.0.1 and a free port, with no
/// persistence and its files in a private temporary directory; killed
/// (SIGKILL) when dropped.
///
/// [`RedisServer::cmd`] is a tiny blocking RESP client, one fresh TCP
/// connection per command, for a test to inspect and plant entries. It is
/// the harness's only Redis client written by hand; the host speaks to
/// Redis with the `redis` crate.
///
/// ```no_run
/// let redis = keepwarm_tests::RedisServer::start();
/// redis.set(b"k", b"v");
/// assert_eq!(redis.get(b"k"), Some(b"v".to_vec()));
/// assert_eq!(redis.keys("k*"), vec![b"k".to_vec()]);
/// ```
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// One RESP reply, as [`RedisServer::cmd`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisReply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR ...`: the server refused the command.
    Error(String),
    /// `:N`.
    Integer(i64),
    /// `$N` and N bytes; `None` for the null bulk string (`$-1`, a missing key).
    Bulk(Option<Vec<u8>>),
    /// `*N` and N replies; `None` for the null array (`*-1`).
    Array(Option<Vec<RedisReply>>),
}

impl RedisReply {
    /// The integer of an integer reply; panics on any other.
    pub fn integer(&self) -> i64 {
        match self {
            RedisReply::Integer(n) => *n,
            other => panic!("expected an integer reply from Redis, got {other:?}"),
        }
    }

    /// The bytes of a bulk string reply (`None` for the null one); panics
    /// on any other.
    pub fn bulk(self) -> Option<Vec<u8>> {
        match self {
            RedisReply::Bulk(bytes) => bytes,
            other => panic!("expected a bulk string reply from Redis, got {other:?}"),
        }
    }

    /// The elements of an array reply (none for the null one); panics on
    /// any other.
    pub fn array(self) -> Vec<RedisReply> {
        match self {
            RedisReply::Array(items) => items.unwrap_or_default(),
            other => panic!("expected an array reply from Redis, got {other:?}"),
        }
    }

    /// Panics unless this is `+OK`.
    pub fn ok(&self) {
        assert_eq!(
            self,
            &RedisReply::Simple("OK".into()),
            "expected +OK from Redis"
        );
    }
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1 and waits until it
    /// answers PING. Panics when the binary is not on `PATH`.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut why = String::new();
        // The free port is free when asked, not necessarily when Redis
        // binds it (a parallel test may take it first): try another.
        for _ in 0..5 {
            let port = free_port();
            match launch_redis(port, dir.path()) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        dir,
                    }
                }
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start on a free port in 5 tries; the last: {why}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port it listens on (the same after [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id; panics after [`RedisServer::kill`].
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running (killed)")
            .id()
    }

    /// Kills the server (SIGKILL) and waits for it: every entry is gone
    /// (it saves nothing), and the port refuses connections.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (killing it first if it
    /// runs), empty, and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + WAIT;
        loop {
            match launch_redis(self.port, self.dir.path()) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "redis-server did not start again on port {}: {why}",
                    self.port
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the server: `libc::SIGSTOP` stalls it (connections
    /// still open, nothing answers), `libc::SIGCONT` resumes it.
    pub fn stop_signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid (still unreaped: `child` is
        // only taken by kill(), which reaps it); no memory involved.
        let done = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(
            done,
            0,
            "kill({}, {signal}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Runs one command (`&[b"SET", key, value]`) over a fresh connection
    /// and returns the reply, an error reply included. Panics when the
    /// server cannot be reached or answers nonsense.
    pub fn cmd(&self, args: &[&[u8]]) -> RedisReply {
        redis_command(self.port, args)
    }

    /// Every key matching the glob `pattern`, sorted, by `SCAN ... MATCH
    /// pattern COUNT 1000` (never `KEYS`).
    pub fn keys(&self, pattern: &str) -> Vec<Vec<u8>> {
        let mut cursor = b"0".to_vec();
        let mut found = Vec::new();
        loop {
            let reply = self
                .cmd(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    b"1000",
                ])
                .array();
            let [next, keys]: [RedisReply; 2] = reply
                .try_into()
                .unwrap_or_else(|r| panic!("SCAN answered {r:?}"));
            cursor = next.bulk().expect("SCAN's cursor");
            found.extend(
                keys.array()
                    .into_iter()
                    .map(|k| k.bulk().expect("SCAN's keys are bulk strings")),
            );
            if cursor == b"0" {
                break;
            }
        }
        // SCAN may return a key twice.
        found.sort();
        found.dedup();
        found
    }

    /// `GET key`: its value, or `None` when there is no such key.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cmd(&[b"GET", key]).bulk()
    }

    /// `SET key value`.
    pub fn set(&self, key: &[u8], value: &[u8]) {
        self.cmd(&[b"SET", key, value]).ok();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// The `redis-server` binary on `PATH`.
fn redis_server_bin() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH: the shared tier's tests run a real Redis; \
                 install the Debian package redis-server (apt-get install redis-server; \
                 .ci/run does)"
            )
        })
}

/// Starts `redis-server` on `port` with its files in `dir` and waits until
/// that process (not another one on the port) answers PING; the error says
/// why not, with what the server printed.
fn launch_redis(port: u16, dir: &Path) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let out = dir.join(format!("redis-{port}.out"));
    let output = std::fs::File::create(&out).unwrap();
    let mut child = Command::new(redis_server_bin())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--protected-mode", "no", "--daemonize", "no"])
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .unwrap_or_else(|e| panic!("starting redis-server: {e}"));
    let printed = || {
        let mut text = std::fs::read_to_string(&out).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&log).unwrap_or_default());
        text
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if redis_ping(port) && redis_pid(port) == Some(child.id()) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {port} exited ({status}):\n{}",
                printed()
            ));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "redis-server on port {port} did not answer PING within {WAIT:?}:\n{}",
                printed()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a server on `port` answers an inline `PING` with `+PONG` (within
/// half a second).
fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    let mut got = 0;
    while got < answer.len() {
        match stream.read(&mut answer[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    answer[..got].starts_with(b"+PONG")
}

/// The process id the server on `port` reports (`INFO server`).
fn redis_pid(port: u16) -> Option<u32> {
    let info = redis_command(port, &[b"INFO", b"server"]).bulk()?;
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// One command over a fresh connection to 127.0.0.1:`port`.
fn redis_command(port: u16, args: &[&[u8]]) -> RedisReply {
    use std::io::Write;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to redis-server on port {port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    (&stream)
        .write_all(&request)
        .unwrap_or_else(|e| panic!("writing to redis-server on port {port}: {e}"));
    read_reply(&mut BufReader::new(&stream))
        .unwrap_or_else(|e| panic!("reading redis-server's reply on port {port}: {e}"))
}

/// Reads one RESP2 reply (arrays recursively).
fn read_reply(reader: &mut impl BufRead) -> std::io::Result<RedisReply> {
    use std::io::{Error, ErrorKind};
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "a reply line cut short: {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    line.truncate(line.len() - 2);
    let Some((&kind, rest)) = line.split_first() else {
        return Err(Error::new(ErrorKind::InvalidData, "an empty reply line"));
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = || {
        text.parse::<i64>()
            .map_err(|e| Error::new(ErrorKind::InvalidData, format!("{text:?}: {e}")))
    };
    Ok(match kind {
        b'+' => RedisReply::Simple(text.clone()),
        b'-' => RedisReply::Error(text.clone()),
        b':' => RedisReply::Integer(number()?),
        b'$' => match usize::try_from(number()?) {
            Err(_) => RedisReply::Bulk(None),
            Ok(len) => {
                let mut bytes = vec![0; len + 2];
                std::io::Read::read_exact(reader, &mut bytes)?;
                bytes.truncate(len);
                RedisReply::Bulk(Some(bytes))
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => RedisReply::Array(None),
            Ok(len) => RedisReply::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        other => {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("unknown reply type {:?}", other as char),
            ))
        }
    })
}
