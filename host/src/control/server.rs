//! The control socket: a Unix domain socket, mode 0600, in the user's private
//! runtime directory; one thread per connection, one JSON request per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::protocol::{parse_request, ErrorCode, Response, MAX_REQUEST_BYTES};
use crate::host::Host;

/// Stack size of the threads that run calls: deep memoized recursion (each
/// level passes through the host and back) needs more than the default 2 MiB.
/// Only touched pages cost memory.
pub const CALL_STACK_BYTES: usize = 64 << 20;

/// Connections served at once; one more gets an error response and is
/// closed, so a flood of clients cannot exhaust the host's threads.
pub const MAX_CONNECTIONS: usize = 512;

/// How long a connection may stay silent before the host closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A bound control socket; the file is removed when this is dropped.
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
}

impl Server {
    /// Binds `path`. A socket file left by a dead host is replaced; a live
    /// host on the same path is an error.
    pub fn bind(path: &Path) -> anyhow::Result<Server> {
        if let Some(dir) = path.parent() {
            crate::paths::ensure_private_dir(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "another keepwarm host is already serving {}; stop it, or start this one with --socket PATH",
                    path.display()
                );
            }
            // Nobody answers: a stale socket of a host that died.
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", path.display()))?;
        Ok(Server {
            path: path.to_owned(),
            listener,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections on a background thread for as long as the process
    /// lives.
    pub fn spawn(self, host: Arc<Host>) -> anyhow::Result<ServerGuard> {
        let listener = self.listener.try_clone()?;
        std::thread::Builder::new()
            .name("keepwarm-control".into())
            .spawn(move || {
                let open = Arc::new(AtomicUsize::new(0));
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::SeqCst);
                        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                        let _ = write_response(
                            &mut stream,
                            &Response::err(
                                ErrorCode::Busy,
                                format!("the host already serves {MAX_CONNECTIONS} connections; retry shortly"),
                            ),
                        );
                        continue;
                    }
                    let host = Arc::clone(&host);
                    let count = Arc::clone(&open);
                    let spawned = std::thread::Builder::new()
                        .name("keepwarm-conn".into())
                        .stack_size(CALL_STACK_BYTES)
                        .spawn(move || {
                            serve(&host, stream);
                            count.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        // No thread for it: the stream was dropped (closed).
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })?;
        Ok(ServerGuard {
            path: self.path.clone(),
            _server: self,
        })
    }
}

/// Keeps the socket file until dropped.
pub struct ServerGuard {
    path: PathBuf,
    _server: Server,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).expect("responses serialize");
    line.push(b'\n');
    stream.write_all(&line)
}

/// Serves one connection until the client closes it, goes silent, or sends
/// an oversized line.
fn serve(host: &Host, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded read: at most MAX_REQUEST_BYTES + 1 bytes per line.
        let n = match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n > MAX_REQUEST_BYTES && line.last() != Some(&b'\n') {
            let _ = write_response(
                &mut writer,
                &Response::err(
                    ErrorCode::BadRequest,
                    format!("request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection"),
                ),
            );
            return;
        }
        let trimmed = line.strip_suffix(b"\n").unwrap_or(&line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        if trimmed.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match parse_request(trimmed) {
            Ok(request) => super::handle(host, request),
            Err(response) => response,
        };
        if write_response(&mut writer, &response).is_err() {
            return;
        }
    }
}
