//! The worker of `keepwarm run` and `keepwarm dev` ([`Serve`]): on the
//! control socket its supervisor hands it, load and watch the libraries and
//! serve until the supervisor stops it; and what every long-running command
//! shares: the exit signals, the terminal's state, [`SHUTDOWN_GRACE`].
//!
//! Every way out takes one path: SIGINT, SIGTERM and SIGHUP stop the
//! listener, let calls in flight finish for up to [`SHUTDOWN_GRACE`], unload
//! the live generation, remove the shadow directory, and return from
//! [`Serve::run`] with `Ok`: exit status 0.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::control::server::Server;
use crate::{watcher, Config, Host};

/// How long a shutdown waits for calls in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a supervisor's worker serves.
pub struct Serve {
    /// The host's configuration (first library, cache bounds, events).
    pub config: Config,
    /// More plugin libraries, sharing the host's caches.
    pub more: Vec<PathBuf>,
    /// The control socket's path.
    pub socket: PathBuf,
    /// What the worker inherited: the listening socket, the ready pipe.
    pub worker: crate::supervisor::WorkerSide,
}

/// Why the host is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `quit`, Ctrl-D or Ctrl-C at the prompt.
    Quit,
    /// A signal (its number).
    Signal(i32),
}

/// Sends an [`Exit::Signal`] through `send` at the first SIGINT, SIGTERM or
/// SIGHUP (from a thread of its own); close the handle when leaving.
pub fn exit_signals(
    send: impl Fn(Exit) + Send + 'static,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("installing the signal handlers")?;
    let handle = signals.handle();
    crate::threads::spawn("keepwarm-signals", None, move || {
        if let Some(signal) = signals.forever().next() {
            send(Exit::Signal(signal));
        }
    })
    .context("spawning the signal thread")?;
    Ok(handle)
}

/// Whether this process may use the terminal on standard input: it is a
/// terminal and this process group is its foreground group. A host started
/// with `&` is not, and touching the terminal would stop it (SIGTTIN).
pub fn owns_terminal() -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    // SAFETY: tcgetpgrp and getpgrp take a descriptor / nothing and only
    // return numbers.
    unsafe { libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() }
}

/// The terminal's settings, restored at exit: a signal may end the host
/// while the prompt has the terminal in raw mode.
pub(crate) struct TerminalState(Option<libc::termios>);

impl TerminalState {
    pub(crate) fn save() -> TerminalState {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `t` when it returns 0.
        let ok = unsafe { libc::tcgetattr(libc::STDIN_FILENO, t.as_mut_ptr()) } == 0;
        // SAFETY: initialized by tcgetattr when ok.
        TerminalState(ok.then(|| unsafe { t.assume_init() }))
    }

    pub(crate) fn restore(&self) {
        if let Some(t) = &self.0 {
            // SAFETY: `t` is a termios tcgetattr filled for this descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

impl Serve {
    /// Serves until SIGINT, SIGTERM or SIGHUP (the supervisor's stop), then
    /// shuts down cleanly.
    pub fn run(self) -> anyhow::Result<()> {
        crate::threads::register_current();
        let (exit_tx, exit_rx) = mpsc::channel::<Exit>();
        // Signals first: a stop during the first load is a clean exit too.
        let signal_handle = exit_signals(move |e| {
            let _ = exit_tx.send(e);
        })?;
        let mut worker = self.worker;
        let server = Server::inherited(&self.socket, worker.take_listener());
        let restarted = self
            .config
            .supervised
            .as_ref()
            .is_some_and(|s| s.start_from.is_some() || s.restarts > 0);
        let host = Host::new(self.config)?;
        for library in &self.more {
            host.add(library)?;
        }
        let libraries: Vec<String> = host
            .plugins()
            .iter()
            .map(|p| p.library().display().to_string())
            .collect();
        if !restarted {
            crate::output::say(&format!(
                "keepwarm: serving {} · control socket {}",
                libraries.join(", "),
                server.path().display()
            ));
        }
        // Watch before the first load, so that no change after it is
        // missed; load before serving, so that a client that connected
        // meanwhile waits in the socket's backlog and finds the plugin loaded.
        let watch = watcher::watch(Arc::clone(&host)).context("watching the library")?;
        watcher::load_initial(&host);
        if restarted {
            // The first load was a kept copy of a build that worked: now
            // look at what the watched path holds (a build that landed
            // meanwhile loads; the one that crashed is refused, once).
            watcher::load_initial(&host);
        }
        let guard = server.spawn(Arc::clone(&host))?;
        worker.ready();
        let _ = exit_rx.recv();
        // One path out, whatever the reason.
        drop(watch);
        drop(guard);
        if !host.shutdown(SHUTDOWN_GRACE) {
            crate::output::say(&format!(
                "keepwarm: calls still running after {} s; leaving anyway",
                SHUTDOWN_GRACE.as_secs()
            ));
        }
        signal_handle.close();
        Ok(())
    }
}
