//! Issue 10: every way a real user, a real build tool or a hostile
//! neighbour broke the host, each driven through the real binary on real
//! plugins and real files (docs/RELIABILITY.md, "Hardening").

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keepwarm_tests::{
    built_library, eventually, keepwarm_bin, replace_atomically, shadow_dirs, HostProcess, Tmpfs,
};
use serde_json::json;

/// A copy of `package`'s library at `dir/name`.
fn copy_to(package: &str, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(built_library(package), &path).unwrap();
    path
}

/// The `misbehaves` library with its marker `MARKER-000000` replaced by
/// `marker` (13 bytes), written to `dir` under a name of its own: a new
/// generation without a new build.
fn misbehaves_variant(dir: &Path, marker: &str) -> PathBuf {
    assert_eq!(marker.len(), 13);
    let mut bytes = std::fs::read(built_library("misbehaves")).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"MARKER-000000")
        .expect("the marker is in the library");
    bytes[at..at + 13].copy_from_slice(marker.as_bytes());
    let path = dir.join(format!("variant-{marker}.so"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The host's resident memory and the mappings of its shadow libraries.
fn mapped_generations(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("/shadow-"))
        .collect();
    files.sort();
    files.dedup();
    files.len()
}

// ---- 1. cargo clean && cargo build --------------------------------------

#[test]
fn cargo_clean_then_build_loads_the_next_build() {
    let dir = tempfile::tempdir().unwrap();
    let lib = copy_to("swap_a", dir.path(), "target/debug/libplugin.so");
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    // cargo clean removes the whole target directory.
    std::fs::remove_dir_all(dir.path().join("target")).unwrap();
    host.wait_for("waiting for");
    let status = host.status();
    assert!(
        status["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("to reappear")),
        "{status}"
    );
    assert!(host.cli(&["status"]).stdout.contains("to reappear"));
    assert_eq!(
        host.call("version", &[]),
        "a",
        "the old build keeps serving"
    );
    // cargo build recreates the directories, then the library.
    std::fs::create_dir_all(dir.path().join("target/debug/deps")).unwrap();
    replace_atomically(&built_library("swap_b"), &lib);
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "b");
    assert_eq!(host.status()["waiting"], serde_json::Value::Null);
}

// ---- 2. a symlinked library ---------------------------------------------

#[test]
fn a_symlinked_library_follows_rebuilds_of_its_target_and_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let target = copy_to("swap_a", dir.path(), "build/debug/libplugin.so");
    let link = dir.path().join("stable/link.so");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let host = HostProcess::start(&link, &[]);
    host.wait_for("generation 1 loaded");
    // A rebuild of the target (cargo's atomic replacement).
    replace_atomically(&built_library("swap_b"), &target);
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "b");
    // The link pointed elsewhere (ln -sf: a new link renamed over the old).
    let other = copy_to("swap_a", dir.path(), "other/libplugin.so");
    let tmp = dir.path().join("stable/link.tmp");
    std::os::unix::fs::symlink(&other, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    host.wait_for("generation 3 reloaded");
    assert_eq!(host.call("version", &[]), "a");
    // And a rebuild of the new target.
    replace_atomically(&built_library("swap_b"), &other);
    host.wait_for("generation 4 reloaded");
    assert_eq!(host.call("version", &[]), "b");
}

// ---- 3. in-place writers that do not truncate ---------------------------

/// Writes `new` over `path` the way rsync --inplace and dd conv=notrunc do:
/// open for writing without truncating, write from the start in two parts
/// with a stall longer than the watcher's quiet period between them, and
/// truncate at the end. Returns while the host may still be looking.
fn rewrite_in_place(path: &Path, new: &[u8], stall: Duration) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let cut = new.len() / 3;
    file.write_all(&new[..cut]).unwrap();
    file.flush().unwrap();
    std::thread::sleep(stall);
    file.write_all(&new[cut..]).unwrap();
    file.set_len(new.len() as u64).unwrap();
    drop(file);
}

#[test]
fn in_place_rewrites_are_loaded_only_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    // Same size (swap_a and swap_b are): old and new bytes mixed, and the
    // ELF sizes agree, so only "someone is writing" tells them apart.
    let lib = copy_to("swap_a", dir.path(), "libplugin.so");
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("whole", &["7"]), json!(["a", 49, "a"]));
    let b = std::fs::read(built_library("swap_b")).unwrap();
    rewrite_in_place(&lib, &b, Duration::from_millis(700));
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("whole", &["7"]), json!(["b", 49, "b"]));
    // Shorter over longer (faults is longer than swap_a): until the final
    // truncate the file ends with the old build's tail.
    let long = copy_to("faults", dir.path(), "libplugin.so");
    host.wait_for("generation 3 reloaded");
    let a = std::fs::read(built_library("swap_a")).unwrap();
    assert!(a.len() < std::fs::metadata(&long).unwrap().len() as usize);
    rewrite_in_place(&long, &a, Duration::from_millis(700));
    host.wait_for("generation 4 reloaded");
    assert_eq!(host.call("version", &[]), "a");
    assert_eq!(host.count("refused"), 0, "{:?}", host.lines());
    // The line reaches the reader thread after the answer: wait for it.
    host.wait_for_nth("reloaded", 3);
    assert_eq!(host.count("reloaded"), 3, "{:?}", host.lines());
}

// ---- 4. special files at the library path -------------------------------

#[test]
fn special_files_at_the_library_path_are_refused_and_never_block() {
    let dir = tempfile::tempdir().unwrap();
    let lib = copy_to("swap_a", dir.path(), "libplugin.so");
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    // A FIFO: nobody will ever write to it.
    std::fs::remove_file(&lib).unwrap();
    let status = Command::new("mkfifo").arg(&lib).status().unwrap();
    assert!(status.success());
    let refusal = host.wait_for("FIFO");
    assert!(refusal.contains("not a regular file"), "{refusal}");
    let reload = host.cli(&["--timeout", "20", "reload"]);
    assert_eq!(reload.status, Some(1), "{reload:?}");
    assert!(reload.stderr.contains("FIFO"), "{reload:?}");
    // A symlink to an endless device.
    std::fs::remove_file(&lib).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &lib).unwrap();
    host.wait_for("character device");
    assert_eq!(host.call("version", &[]), "a", "generation 1 keeps serving");
    // A real build loads again.
    std::fs::remove_file(&lib).unwrap();
    replace_atomically(&built_library("swap_b"), &lib);
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "b");
}

// ---- 5. a full runtime file system --------------------------------------

#[test]
fn a_full_runtime_dir_is_reported_and_the_build_loads_when_space_returns() {
    let Some(tmpfs) = Tmpfs::mount(24) else {
        // Mounting needs root (as on the development and CI machines);
        // elsewhere say loudly that this row was not exercised.
        eprintln!("SKIPPED a_full_runtime_dir_…: mounting a tmpfs needs root");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lib = copy_to("swap_a", dir.path(), "libplugin.so");
    let host = HostProcess::spawn(
        &["run".into(), lib.clone().into(), "--no-repl".into()],
        None,
        &[("XDG_RUNTIME_DIR", tmpfs.0.path())],
    );
    host.wait_for("generation 1 loaded");
    // Fill the file system, leaving less than a library's room.
    let filler = tmpfs.0.path().join("keepwarm/filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
    }
    replace_atomically(&built_library("swap_b"), &lib);
    let line = host.wait_for("no space in");
    assert!(
        line.contains("MiB free") && line.contains("library is"),
        "{line}"
    );
    assert_eq!(host.call("version", &[]), "a", "generation 1 keeps serving");
    // No partial copy is left behind: the lock file and generation 1 only.
    let shadow = shadow_dirs(tmpfs.0.path());
    assert_eq!(shadow.len(), 1, "{shadow:?}");
    let files: Vec<String> = std::fs::read_dir(&shadow[0])
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "lock and gen-1 only: {files:?}");
    // Space returns: the same build loads without a new event.
    std::fs::remove_file(&filler).unwrap();
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "b");
    drop(host);
}

// ---- 6 and 7. exits that leave damage, signals --------------------------

/// Starts `keepwarm run LIB --no-repl` with its own runtime directory.
fn spawn_host(lib: &Path, xdg: &Path, socket: &Path) -> std::process::Child {
    Command::new(keepwarm_bin())
        .arg("run")
        .arg(lib)
        .arg("--no-repl")
        .arg("--socket")
        .arg(socket)
        .env("XDG_RUNTIME_DIR", xdg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the host at `socket` answers a request: it has loaded its
/// library (it serves only after the first load) and made its files.
fn wait_for_socket(socket: &Path) {
    use std::io::{BufRead, Write};
    eventually("the host's socket answers", || {
        let Ok(mut stream) = UnixStream::connect(socket) else {
            return false;
        };
        if stream.write_all(b"{\"cmd\":\"status\"}\n").is_err() {
            return false;
        }
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line).is_ok() && line.contains("\"ok\":true")
    });
}

#[test]
fn sigterm_sigint_and_sighup_are_a_clean_exit_that_leaves_nothing() {
    let lib = built_library("swap_a");
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let xdg = tempfile::tempdir().unwrap();
        let socket = xdg.path().join("host.sock");
        let mut child = spawn_host(&lib, xdg.path(), &socket);
        wait_for_socket(&socket);
        // The socket may answer before the first load made its shadow copy.
        eventually("the first load made its shadow directory", || {
            shadow_dirs(xdg.path()).len() == 1
        });
        // SAFETY: kill with a pid of our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {signal}: {status:?}");
        assert!(shadow_dirs(xdg.path()).is_empty(), "signal {signal}");
        assert!(!socket.exists(), "signal {signal}: the socket is removed");
    }
}

#[test]
fn a_killed_hosts_leftovers_are_swept_but_a_live_hosts_are_not() {
    let lib = built_library("swap_a");
    let xdg = tempfile::tempdir().unwrap();
    let live_socket = xdg.path().join("live.sock");
    let mut live = spawn_host(&lib, xdg.path(), &live_socket);
    wait_for_socket(&live_socket);
    let killed_socket = xdg.path().join("killed.sock");
    let mut killed = spawn_host(&lib, xdg.path(), &killed_socket);
    wait_for_socket(&killed_socket);
    assert_eq!(shadow_dirs(xdg.path()).len(), 2);
    // Both processes of that host die at once, so nothing cleans up. The
    // supervisor is stopped first (stopped, it cannot start another
    // worker), the worker killed, then the supervisor. (A supervisor killed
    // alone has its worker stop cleanly and remove these files; so does a
    // stopped worker whose supervisor dies: its process group is orphaned,
    // and the kernel continues it with SIGHUP.)
    let workers = keepwarm_tests::children_of(killed.id());
    assert_eq!(workers.len(), 1, "one worker");
    // SAFETY: kill(2) on our own child and its child; no memory involved.
    unsafe {
        libc::kill(killed.id() as i32, libc::SIGSTOP);
        libc::kill(workers[0] as i32, libc::SIGKILL);
    }
    keepwarm_tests::wait_until_dead(workers[0]);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(shadow_dirs(xdg.path()).len(), 2, "SIGKILL leaves its files");
    // The next host sweeps the dead one's, and keeps the live one's.
    let next_socket = xdg.path().join("next.sock");
    let mut next = spawn_host(&lib, xdg.path(), &next_socket);
    wait_for_socket(&next_socket);
    assert_eq!(shadow_dirs(xdg.path()).len(), 2, "dead swept, live kept");
    let out = Command::new(keepwarm_bin())
        .args(["--socket"])
        .arg(&live_socket)
        .args(["call", "version"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"a\"");
    for child in [&mut live, &mut next] {
        // SAFETY: our own children.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
    assert!(shadow_dirs(xdg.path()).is_empty());
}

// ---- 8. --socket PATH never damages what is there -----------------------

#[test]
fn the_socket_path_never_damages_what_is_there() {
    let lib = built_library("swap_a");
    let xdg = tempfile::tempdir().unwrap();
    // A shared directory (mode 1777) keeps its mode.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = shared.path().join("kw.sock");
    let mut child = spawn_host(&lib, xdg.path(), &socket);
    wait_for_socket(&socket);
    let mode = std::fs::metadata(shared.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o1777, "the directory's mode is untouched");
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();

    // A regular file at PATH is refused and left as it was.
    let file = shared.path().join("notes.txt");
    std::fs::write(&file, "my notes").unwrap();
    let out = Command::new(keepwarm_bin())
        .arg("run")
        .arg(&lib)
        .args(["--no-repl", "--socket"])
        .arg(&file)
        .env("XDG_RUNTIME_DIR", xdg.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "my notes");

    // A stale socket (nobody answers) is replaced.
    let stale = shared.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut child = spawn_host(&lib, xdg.path(), &stale);
    wait_for_socket(&stale);
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

// ---- 9. broken stdout ---------------------------------------------------

#[test]
fn a_closed_stdout_never_stops_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let lib = copy_to("swap_a", dir.path(), "libplugin.so");
    let xdg = tempfile::tempdir().unwrap();
    let socket = xdg.path().join("host.sock");
    // `keepwarm run LIB --no-repl | head -0`: the reader is gone at once.
    let mut child = Command::new(keepwarm_bin())
        .arg("run")
        .arg(&lib)
        .args(["--no-repl", "--socket"])
        .arg(&socket)
        .env("XDG_RUNTIME_DIR", xdg.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    wait_for_socket(&socket);
    let ask = |request: serde_json::Value| {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    // Each reset prints a line; with the old println! each one killed its
    // connection thread and leaked one of the connection slots.
    ask(json!({"cmd": "call", "function": "whole", "args": [3]}));
    for _ in 0..600 {
        let r = ask(json!({"cmd": "reset", "cache": "sq"}));
        assert_eq!(r["ok"], true, "{r}");
    }
    // The watcher prints a line per reload: it still reloads.
    replace_atomically(&built_library("swap_b"), &lib);
    eventually("generation 2 loads", || {
        ask(json!({"cmd": "status"}))["result"]["generation"] == 2
    });
    let v = ask(json!({"cmd": "call", "function": "version"}));
    assert_eq!(v["result"], "b");
    child.kill().unwrap();
    child.wait().unwrap();
}

// ---- 10. a host started with & ------------------------------------------

const BACKGROUND: &str = r#"
import os, pty, select, sys, time, subprocess
binary, lib, sock, log = sys.argv[1:5]
pid, fd = pty.fork()
if pid == 0:
    # A job-control shell on the terminal starts the host in the background.
    os.execv("/bin/sh", ["sh", "-c",
        "set -m; '%s' run '%s' --socket '%s' > '%s' 2>&1 & wait" % (binary, lib, sock, log)])
end = time.time() + 60
while time.time() < end:
    try:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            os.read(fd, 65536)
    except OSError:
        pass
    if os.path.exists(sock):
        r = subprocess.run([binary, "--socket", sock, "--timeout", "20", "call", "square", "3"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            print("CALL", r.stdout.strip())
            break
os.kill(pid, 9)
"#;

#[test]
fn a_host_started_in_the_background_serves_without_a_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bg.sock");
    let log = dir.path().join("host.log");
    let out = Command::new("python3")
        .arg("-c")
        .arg(BACKGROUND)
        .arg(keepwarm_bin())
        .arg(built_library("example-plugin"))
        .arg(&socket)
        .arg(&log)
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let host_log = std::fs::read_to_string(&log).unwrap_or_default();
    // Stop the host (it is in its own process group).
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(socket.to_str().unwrap())
        .status();
    assert!(stdout.contains("CALL 9"), "{stdout}\nhost: {host_log}");
    assert!(host_log.contains("no prompt"), "{host_log}");
}

#[test]
fn a_stopped_host_makes_the_cli_give_up_with_a_message() {
    let host = HostProcess::start(&built_library("swap_a"), &[]);
    // SAFETY: our own child.
    let worker = host.worker_pid();
    unsafe { libc::kill(worker as i32, libc::SIGSTOP) };
    let out = host.cli(&["--timeout", "1", "status"]);
    // SAFETY: as above.
    unsafe { libc::kill(worker as i32, libc::SIGCONT) };
    assert_eq!(out.status, Some(3), "{out:?}");
    assert!(out.stderr.contains("did not answer in 1 s"), "{out:?}");
    assert_eq!(host.call("version", &[]), "a");
}

// ---- 11 and 12. fd exhaustion, busy and bad requests --------------------

#[test]
fn under_a_small_fd_limit_extra_clients_hear_busy_and_reloads_still_land() {
    // Our own limit must allow the clients.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let dir = tempfile::tempdir().unwrap();
    let lib = copy_to("swap_a", dir.path(), "libplugin.so");
    let xdg = tempfile::tempdir().unwrap();
    let socket = xdg.path().join("host.sock");
    // The common soft = hard = 1024: nothing to raise.
    let mut command = Command::new("prlimit");
    command
        .args(["--nofile=1024:1024", "--"])
        .arg(keepwarm_bin())
        .arg("run")
        .arg(&lib)
        .args(["--no-repl", "--socket"])
        .arg(&socket)
        .env("XDG_RUNTIME_DIR", xdg.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    wait_for_socket(&socket);
    // Hold more connections than fit; each one is served or told busy.
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..700 {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // A connection over the cap may be answered and closed before the
        // request is even written: the answer is still there to read.
        let _ = writeln!(s, "{}", json!({"cmd": "status"}));
        let mut line = String::new();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        reader.read_line(&mut line).unwrap();
        if line.contains("\"busy\"") {
            busy += 1;
        } else {
            assert!(line.contains("\"ok\":true"), "{line}");
            held.push((s, reader));
        }
    }
    eprintln!(
        "fd limit 1024: {} connections held, {busy} told busy",
        held.len()
    );
    assert!(
        busy > 0 && held.len() >= 400,
        "{} held, {busy} busy",
        held.len()
    );
    // The CLI hears busy: exit 1, "try again".
    let out = Command::new(keepwarm_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("try again"), "{stderr}");
    // A build landing now still loads (descriptors were kept for it).
    replace_atomically(&built_library("swap_b"), &lib);
    let (s, reader) = &mut held[0];
    eventually("generation 2 loads", || {
        writeln!(s, "{}", json!({"cmd": "status"})).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.contains("\"generation\":2")
    });
    // The host does not spin while it is full.
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    // The worker serves the connections; the supervisor only waits.
    let worker = {
        let (s, reader) = &mut held[0];
        writeln!(s, "{}", json!({"cmd": "status"})).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["result"]["worker_pid"].as_u64().unwrap() as u32
    };
    let before = cpu(worker) + cpu(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu(worker) + cpu(child.id()) - before;
    assert!(ticks < 50, "the host used {ticks} ticks in 1 s while full");
    drop(held);
    eventually("a slot is free again", || {
        Command::new(keepwarm_bin())
            .arg("--socket")
            .arg(&socket)
            .arg("status")
            .output()
            .unwrap()
            .status
            .success()
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn an_oversized_request_is_reported_as_a_bad_request_not_a_broken_pipe() {
    let host = HostProcess::start(&built_library("swap_a"), &[]);
    // Twelve arguments of 100 kB (one argument may not exceed 128 KiB):
    // a request line over the host's 1 MiB limit.
    let part = "x".repeat(100_000);
    let mut args = vec!["call", "version"];
    args.extend(std::iter::repeat_n(part.as_str(), 12));
    let out = host.cli(&args);
    assert_eq!(out.status, Some(2), "{:?}", out.stderr);
    assert!(out.stderr.contains("longer than"), "{}", out.stderr);
}

// ---- 13 and 14. plugins that refuse, and computations that fail ---------

#[test]
fn a_rust_plugin_refusing_in_on_load_100_times_never_crashes_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(misbehaves_variant(dir.path(), "MARKER-000001"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    std::fs::copy(misbehaves_variant(dir.path(), "REFUSE-000001"), &lib).unwrap();
    host.wait_for("refuses to load");
    for _ in 0..100 {
        let out = host.cli(&["reload"]);
        assert_eq!(out.status, Some(1), "{out:?}");
        assert!(out.stderr.contains("refuses to load"), "{out:?}");
    }
    assert_eq!(host.call("version", &[]), "MARKER-000001");
    assert_eq!(
        host.count("unloading REFUSE"),
        0,
        "no on_unload after a refusal"
    );
    replace_atomically(&misbehaves_variant(dir.path(), "MARKER-000002"), &lib);
    host.wait_for("generation 2 reloaded");
    assert_eq!(host.call("version", &[]), "MARKER-000002");
    host.wait_for("unloading MARKER-000001");
}

fn c_misbehaves(dir: &Path, marker: &str) -> PathBuf {
    let out = dir.join(format!("libc_{marker}.so"));
    let status = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-shared",
            "-fPIC",
        ])
        .arg("-I")
        .arg(keepwarm_tests::root().join("plugin-api/include"))
        .arg(keepwarm_tests::root().join("tests/fixtures/c_misbehaves/plugin.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "cc failed on c_misbehaves/plugin.c");
    let mut bytes = std::fs::read(&out).unwrap();
    let at = bytes
        .windows(13)
        .position(|w| w == b"MARKER-000000")
        .unwrap();
    bytes[at..at + 13].copy_from_slice(marker.as_bytes());
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn a_c_plugin_that_refuses_and_fails_computations_never_wedges_or_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(c_misbehaves(dir.path(), "MARKER-000001"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    // A computation that fails (KW_ERROR, nothing written) frees the key.
    let first = host.cli(&["--timeout", "10", "call", "flaky", "7"]);
    assert_eq!(first.status, Some(1), "{first:?}");
    assert_eq!(host.call("flaky", &["7"]), 42, "the key is free again");
    // A NULL computation is refused and frees the key too.
    let null = host.cli(&["--timeout", "10", "call", "null_compute", "8"]);
    assert_eq!(null.status, Some(1), "{null:?}");
    assert_eq!(host.call("flaky", &["8"]), 42);
    // Refused 100 times, with an on_unload that logs.
    std::fs::copy(c_misbehaves(dir.path(), "REFUSE-000001"), &lib).unwrap();
    host.wait_for("this copy refuses to load");
    for _ in 0..100 {
        assert_eq!(host.cli(&["reload"]).status, Some(1));
    }
    assert_eq!(host.call("version", &[]), "MARKER-000001");
    assert_eq!(host.count("C plugin unloading"), 0);
}

// ---- 17. a persistent connection and 200 reloads -------------------------

#[test]
fn a_persistent_connection_does_not_pin_every_generation() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(misbehaves_variant(dir.path(), "MARKER-000000"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    let mut conn = UnixStream::connect(host.socket()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ask = |request: serde_json::Value| {
        writeln!(conn, "{request}").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    const RELOADS: usize = 200;
    for n in 1..=RELOADS {
        // The thread serving this connection touches the generation's
        // thread-local (whose destructor would pin it).
        let r = ask(json!({"cmd": "call", "function": "tls"}));
        assert_eq!(r["ok"], true, "{r}");
        let variant = misbehaves_variant(dir.path(), &format!("MARKER-{n:06}"));
        replace_atomically(&variant, &lib);
        std::fs::remove_file(variant).unwrap();
        host.wait_for_nth("reloaded", n);
    }
    let r = ask(json!({"cmd": "call", "function": "version"}));
    assert_eq!(r["result"], format!("MARKER-{RELOADS:06}"));
    let mapped = mapped_generations(host.worker_pid());
    eprintln!("persistent connection: {RELOADS} reloads, {mapped} shadow libraries mapped");
    // Before connections were recycled every generation stayed mapped
    // (200); now the live one and the one the connection last ran, plus at
    // most a couple whose unmapping glibc defers to a later dlclose.
    assert!(mapped <= 8, "{mapped} generations still mapped");
}

// ---- 18. a plugin thread that outlives its generation -------------------

#[test]
fn a_thread_left_running_by_a_retired_generation_cannot_crash_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libplugin.so");
    std::fs::copy(misbehaves_variant(dir.path(), "MARKER-000000"), &lib).unwrap();
    let host = HostProcess::start(&lib, &[]);
    host.wait_for("generation 1 loaded");
    assert_eq!(host.call("start_thread", &[]), true);
    eventually("the thread fills its cache", || {
        host.stats()
            .get("spin")
            .is_some_and(|s| s["entries"].as_u64().unwrap() > 10)
    });
    for n in 1..=5 {
        let variant = misbehaves_variant(dir.path(), &format!("MARKER-{n:06}"));
        replace_atomically(&variant, &lib);
        host.wait_for_nth("reloaded", n);
    }
    host.wait_for("left 1 thread(s) running after on_unload");
    // The old thread's puts are refused as retired: the cache stops growing.
    let entries = || host.stats()["spin"]["inserts"].as_u64().unwrap();
    let settled = entries();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(entries(), settled, "a retired generation stores nothing");
    assert_eq!(host.call("version", &[]), "MARKER-000005");
    assert!(
        mapped_generations(host.worker_pid()) >= 2,
        "generation 1 stays mapped"
    );
}

// ---- 19. unbounded growth -----------------------------------------------

#[test]
fn many_caches_are_cheap_and_the_reload_line_stays_short() {
    use keepwarm::{Config, Event, Host};
    use std::sync::Arc;
    let events = Arc::new(parking_lot::Mutex::new(Vec::<Event>::new()));
    let sink = Arc::clone(&events);
    let config =
        Config::new(built_library("swap_a")).on_event(move |e| sink.lock().push(e.clone()));
    let host = Host::new(config).unwrap();
    host.reload(false).unwrap();
    // 100,000 names: copying the whole name map at each creation would
    // copy ~5·10⁹ entries; amortized O(1) creation takes a moment.
    for i in 0..100_000 {
        host.store().cache(&format!("dyn-{i}"));
    }
    assert_eq!(host.store().all().len(), 100_001);
    host.reload(true).unwrap();
    // The reload event lists every cache kept; the binary's line names 8
    // and counts the rest (`render::tests` in keepwarm-cli checks the
    // wording, and `keepwarm run` shows it).
    let kept = events
        .lock()
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Loaded {
                generation: 2,
                kept,
                ..
            } => Some(kept.len()),
            _ => None,
        })
        .expect("a reload event for generation 2");
    assert_eq!(kept, 100_001);
}
