//! A host embedded in a process and dropped leaves no thread, socket or
//! file behind (issue 12). Alone in its test binary: it counts the
//! process's threads and sets the runtime directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use keepwarm_tests::{built_library, eventually, shadow_dirs};

/// The kernel threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_dropped_host_leaves_no_thread_socket_or_file() {
    use keepwarm::control::server::Server;
    use keepwarm::{Config, Host};
    let xdg = tempfile::tempdir().unwrap();
    // SAFETY: this is the only test of this binary, so no other thread
    // reads or writes the environment while it is set.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", xdg.path()) };
    let socket = xdg.path().join("embedded.sock");
    let before = threads();
    {
        let server = Server::bind(&socket).unwrap();
        let host = Host::new(Config::new(built_library("swap_a"))).unwrap();
        let watch = keepwarm::watcher::watch(Arc::clone(&host)).unwrap();
        host.reload(false).unwrap();
        let guard = server.spawn(Arc::clone(&host)).unwrap();
        let version: String = host.call("version", &()).unwrap();
        assert_eq!(version, "a");
        // A client over the socket, served by a connection thread.
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .write_all(b"{\"cmd\":\"call\",\"function\":\"version\"}\n")
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        assert!(answer.contains("\"result\":\"a\""), "{answer}");
        assert_eq!(shadow_dirs(xdg.path()).len(), 1);
        drop(stream);
        drop(guard);
        drop(watch);
        drop(host);
    }
    eventually("every host thread ended", || threads() <= before);
    assert!(!socket.exists(), "the socket file is removed");
    eventually("the shadow directory is removed", || {
        shadow_dirs(xdg.path()).is_empty()
    });
}
