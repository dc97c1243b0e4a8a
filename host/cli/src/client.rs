//! The client side of the control socket, used by the CLI subcommands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::protocol::{Request, Response};

/// Why the client could not get an answer.
#[derive(Debug)]
pub enum ClientError {
    /// No host answers at the socket (exit status 3).
    NoHost(String),
    /// Several hosts run and none was chosen (exit status 2).
    Ambiguous(String),
    /// The host answered something that is not a response.
    Protocol(String),
    /// The connection closed before the answer came (the host's worker
    /// died, or the host stopped).
    Dropped(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoHost(m)
            | ClientError::Ambiguous(m)
            | ClientError::Protocol(m)
            | ClientError::Dropped(m) => f.write_str(m),
        }
    }
}

/// Finds the socket of the host to talk to when neither `--socket` nor
/// `KEEPWARM_SOCKET` named one: the one live socket in the runtime directory.
pub fn discover() -> Result<PathBuf, ClientError> {
    let dir = crate::paths::runtime_dir().map_err(|e| ClientError::NoHost(e.to_string()))?;
    let mut live = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sock") && UnixStream::connect(&path).is_ok() {
                live.push(path);
            }
        }
    }
    live.sort();
    match live.len() {
        0 => Err(ClientError::NoHost(format!(
            "no keepwarm host is running (no live socket in {}); start one with `keepwarm run LIB` (or `keepwarm serve` for caches only), or pass --socket PATH",
            dir.display()
        ))),
        1 => Ok(live.remove(0)),
        _ => Err(ClientError::Ambiguous(format!(
            "{} keepwarm hosts are running; choose one with --socket PATH or KEEPWARM_SOCKET:\n{}",
            live.len(),
            live.iter().map(|p| format!("  {}", p.display())).collect::<Vec<_>>().join("\n")
        ))),
    }
}

/// Sends one request and reads its response, waiting at most `timeout`
/// (forever with `None`). A host that answered before it closed the
/// connection (a `busy` or `bad_request` answer) is heard even when sending
/// the request failed.
pub fn request_within(
    socket: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        ClientError::NoHost(format!(
            "no keepwarm host answers at {} ({e}); start one with `keepwarm run LIB`",
            socket.display()
        ))
    })?;
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    let sent = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    let silent = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    match (&sent, &read) {
        (_, Ok(n)) if *n > 0 => {}
        (Err(e), _) | (_, Err(e)) if silent(e) => {
            return Err(ClientError::NoHost(format!(
                "the host at {} did not answer in {} s — it may be stopped (a host started with `&` and then stopped?), or the call is still running; see `keepwarm status`, or pass --timeout SECS",
                socket.display(),
                timeout.map_or(0, |t| t.as_secs())
            )))
        }
        (Err(e), _) => {
            return Err(ClientError::NoHost(format!(
                "sending to {}: {e}",
                socket.display()
            )))
        }
        (Ok(()), Err(e)) => {
            return Err(ClientError::Dropped(format!(
                "reading the answer from {}: {e}",
                socket.display()
            )))
        }
        (Ok(()), Ok(_)) => {
            return Err(ClientError::Dropped(format!(
                "the host at {} closed the connection without answering",
                socket.display()
            )))
        }
    }
    serde_json::from_str(&answer).map_err(|e| {
        ClientError::Protocol(format!("the host sent an invalid response ({e}): {answer}"))
    })
}

/// How long a client waits for a restarted host to answer after its
/// connection dropped.
pub const RESTART_WAIT: Duration = Duration::from_secs(10);

/// [`request_within`], surviving a crash of the host's worker: when the
/// connection drops before the answer, asks the host (restarted by its
/// supervisor) what happened. A call that was running when the worker
/// crashed is answered with a `plugin_crashed` error that says what crashed
/// and where the host restarted ("plugin crashed: SIGSEGV in segv()
/// (generation 3); the host restarted on generation 3"); any other request
/// is sent once more.
pub fn request_surviving(
    socket: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let sent = keepwarm::persist::now_ms() as f64 / 1000.0;
    let dropped = match request_within(socket, request, timeout) {
        Err(ClientError::Dropped(m)) => m,
        other => return other,
    };
    let status = request_within(socket, &Request::Status { v: Some(1) }, Some(RESTART_WAIT))
        .ok()
        .and_then(|r| r.result)
        .and_then(|r| keepwarm::Status::from_json(&r).ok());
    let crash = status
        .as_ref()
        .and_then(|s| s.last_crash.clone())
        // The clocks are the same machine's; a crash before the request
        // was sent is not this one.
        .filter(|c| c.time + 0.5 >= sent);
    // A call or a reload runs plugin code: the crash is its answer (a
    // reload sent again would load the crashing build again). Other requests
    // run none, and are sent once more.
    match (crash, request) {
        (Some(crash), Request::Call { .. } | Request::Reload { .. }) => {
            let restarted = match crash.restarted_on {
                Some(g) => format!("the host restarted on generation {g}"),
                None => "the host restarted and waits for a build that loads".to_owned(),
            };
            Ok(Response::err(
                crate::control::protocol::ErrorCode::PluginCrashed,
                format!("plugin crashed: {}; {restarted}", crash.what()),
            ))
        }
        (None, Request::Call { .. }) if status.is_none() => Err(ClientError::Dropped(dropped)),
        // Not a call, or nothing crashed: once more.
        _ => request_within(socket, request, timeout),
    }
}
