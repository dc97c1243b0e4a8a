//! The control socket: a Unix domain socket, mode 0600, in the user's private
//! runtime directory; one thread per connection, one JSON request per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Context, Error, Result};

use super::protocol::{parse_request, ErrorCode, Response, MAX_REQUEST_BYTES};
use crate::host::Host;

/// Stack size of the threads that run calls: deep memoized recursion (each
/// level passes through the host and back) needs more than the default 2 MiB.
/// Only touched pages cost memory.
pub const CALL_STACK_BYTES: usize = 64 << 20;

/// Connections served at once (at most; fewer when the process may open
/// few files, see [`connection_cap`]); one more gets a `busy` answer and is
/// closed, so a flood of clients cannot exhaust the host's threads.
pub const MAX_CONNECTIONS: usize = 512;

/// File descriptors kept for everything but connections: the library, its
/// shadow copy, dlopen, the watcher, the terminal, a cargo child in `dev`.
const RESERVED_FDS: u64 = 64;

/// Raises this process's soft limit of open files to its hard limit (the
/// common soft limit of 1,024 would come before the connection cap) and
/// returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// How many connections fit under a limit of `fd_limit` open files: each
/// takes two descriptors (the stream and its writer clone), and
/// `RESERVED_FDS` stay free for loading the next build.
pub fn connection_cap(fd_limit: u64) -> usize {
    let fit = fd_limit.saturating_sub(RESERVED_FDS) / 2;
    (fit as usize).clamp(1, MAX_CONNECTIONS)
}

/// How long a connection may stay silent before the host closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A bound control socket; the file is removed when this is dropped.
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
    /// Whether this server bound the socket (and removes its file when it
    /// stops); a supervisor's worker serves a listener it inherited.
    owns_path: bool,
}

impl Server {
    /// Binds `path`. A socket file left by a dead host is replaced; a live
    /// host on the same path is an error, and so is anything at `path` that
    /// is not a socket (it is never removed). The directory is created
    /// (mode 0700) when missing; the mode of an existing directory is never
    /// changed, except the host's own runtime directory, which must be private.
    pub fn bind(path: &Path) -> Result<Server> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let runtime = crate::paths::runtime_dir()?;
            if dir == runtime {
                // runtime_dir() made it private already.
            } else if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .context(|| format!("creating {}", dir.display()))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::new(format!(
                    "cannot inspect {}: {e}",
                    path.display()
                )))
            }
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::new(format!(
                        "another keepwarm host is already serving {}; stop it, or start this one with --socket PATH",
                        path.display()
                    )));
                }
                // Nobody answers: a stale socket of a host that died.
                std::fs::remove_file(path)
                    .context(|| format!("removing stale socket {}", path.display()))?;
            }
            Ok(meta) => {
                let what = if meta.is_dir() {
                    "a directory"
                } else if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else if meta.is_file() {
                    "a regular file"
                } else {
                    "not a socket"
                };
                return Err(Error::new(format!(
                    "{} exists and is {what}, not a socket; keepwarm will not replace it — choose another --socket PATH (or remove it yourself)",
                    path.display()
                )));
            }
        }
        let listener =
            UnixListener::bind(path).context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .context(|| format!("chmod 600 {}", path.display()))?;
        Ok(Server {
            path: path.to_owned(),
            listener,
            owns_path: true,
        })
    }

    /// Serves `listener`, bound at `path` by another process (a supervisor
    /// that keeps it across restarts of this one); the socket file is left
    /// to that process.
    pub fn inherited(path: &Path, listener: UnixListener) -> Server {
        Server {
            path: path.to_owned(),
            listener,
            owns_path: false,
        }
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections on a background thread until the returned guard
    /// is dropped.
    pub fn spawn(self, host: Arc<Host>) -> Result<ServerGuard> {
        let listener = self
            .listener
            .try_clone()
            .context(|| "duplicating the control socket".into())?;
        listener
            .set_nonblocking(false)
            .context(|| "configuring the control socket".into())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let cap = connection_cap(raise_fd_limit());
        let stop = Arc::clone(&stopping);
        let thread = crate::threads::spawn("keepwarm-control", None, move || {
            accept_loop(&listener, &host, &stop, cap)
        })
        .context(|| "starting the control thread".into())?;
        Ok(ServerGuard {
            path: self.path.clone(),
            stopping,
            thread: Some(thread),
            _server: self,
        })
    }
}

/// Decrements the count of open connections when the connection ends,
/// however it ends (a panic included).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &UnixListener, host: &Arc<Host>, stopping: &AtomicBool, cap: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut backoff = Duration::from_millis(10);
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) or another
                // failure: back off instead of spinning on the error.
                let _ = e;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= cap {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_response(
                &mut stream,
                &Response::err(
                    ErrorCode::Busy,
                    format!("the host already serves {cap} connections; try again shortly"),
                ),
            );
            continue;
        }
        let slot = Slot(Arc::clone(&open));
        let Ok(writer) = stream.try_clone() else {
            continue; // the slot is given back as it drops
        };
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
        let connection = Connection {
            reader: BufReader::new(stream),
            writer,
            pending: None,
            session: super::leases::Session::new(),
            _slot: slot,
        };
        spawn_connection(Arc::clone(host), connection);
    }
}

/// One client's connection, handed from thread to thread.
struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A request line read by the previous thread and not yet answered.
    pending: Option<Vec<u8>>,
    /// The connection's leases (`get_or_wait`), ended when it closes.
    session: super::leases::Session,
    _slot: Slot,
}

/// Serves `connection` on a new thread (if none can be made, the
/// connection is closed and its slot given back).
fn spawn_connection(host: Arc<Host>, connection: Connection) {
    let _ = crate::threads::spawn("keepwarm-conn", Some(CALL_STACK_BYTES), move || {
        if let Some(next) = serve(&host, connection) {
            spawn_connection(host, next);
        }
    });
}

/// Serves until dropped; then accepts no more connections, removes the
/// socket file and waits for the accepting thread to end (connections
/// already open end when their clients close them or go silent).
pub struct ServerGuard {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _server: Server,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self._server.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
        // Wake the accept loop so it sees the flag and returns.
        // SAFETY: shutdown on a listening descriptor we own wakes a thread
        // blocked in accept on Linux; it takes no memory.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self._server.listener),
                libc::SHUT_RDWR,
            )
        };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).expect("responses serialize");
    line.push(b'\n');
    stream.write_all(&line)
}

/// Serves one connection until the client closes it, goes silent, or sends
/// an oversized line. Returns the connection when it should move to a fresh
/// thread: this one ran code of a generation that is no longer live, and
/// its thread-locals would keep that generation mapped; a thread that ends
/// runs their destructors and lets it go.
fn serve(host: &Host, mut c: Connection) -> Option<Connection> {
    let mut called: Option<u64> = None;
    let mut line = c.pending.take().unwrap_or_default();
    loop {
        if line.is_empty() {
            // Bounded read: at most MAX_REQUEST_BYTES + 1 bytes per line.
            let n = match (&mut c.reader)
                .take(MAX_REQUEST_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if n > MAX_REQUEST_BYTES && line.last() != Some(&b'\n') {
                let _ = write_response(
                    &mut c.writer,
                    &Response::err(
                        ErrorCode::BadRequest,
                        format!("request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection"),
                    ),
                );
                return None;
            }
        }
        let trimmed = line.strip_suffix(b"\n").unwrap_or(&line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        if trimmed.iter().all(u8::is_ascii_whitespace) {
            line.clear();
            continue;
        }
        let request = parse_request(trimmed);
        if let Ok(super::protocol::Request::Call { .. }) = &request {
            let live = host.loads();
            if called.is_some_and(|g| g != live) {
                c.pending = Some(std::mem::take(&mut line));
                return Some(c);
            }
            called = Some(live);
        }
        let response = match request {
            Ok(request) => super::handle_in(host, request, &c.session),
            Err(response) => response,
        };
        if write_response(&mut c.writer, &response).is_err() {
            return None;
        }
        line.clear();
    }
}
