//! The long-running part shared by `keepwarm run` and `keepwarm dev`: bind
//! the control socket, load and watch the library, serve, and read the
//! prompt (or wait) until the user leaves.
//!
//! Every way out takes one path: `quit`, end of input, Ctrl-C at an empty
//! prompt, SIGINT, SIGTERM and SIGHUP all stop the listener (the socket file
//! goes), let calls in flight finish for up to [`SHUTDOWN_GRACE`], unload
//! the live generation, remove the shadow directory, and return from
//! [`Serve::run`] with `Ok`: exit status 0.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::control::server::Server;
use crate::{paths, watcher, Config, Host};

/// How long a shutdown waits for calls in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a host is served.
pub struct Serve {
    /// The host's configuration (first library, cache bounds, events).
    pub config: Config,
    /// More plugin libraries, sharing the host's caches.
    pub more: Vec<PathBuf>,
    /// The control socket; the library's default socket when `None`.
    pub socket: Option<PathBuf>,
    /// Never read commands from the terminal.
    pub no_repl: bool,
    /// Set in a supervisor's worker: the socket is inherited, not bound.
    pub worker: Option<crate::supervisor::WorkerSide>,
}

/// Why the host is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `quit`, Ctrl-D or Ctrl-C at the prompt.
    Quit,
    /// A signal (its number).
    Signal(i32),
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
    /// Serves until `quit`, end of input, SIGINT, SIGTERM or SIGHUP, then
    /// shuts down cleanly. `started` runs once the host is up, with it.
    pub fn run(self, started: impl FnOnce(&Arc<Host>) -> anyhow::Result<()>) -> anyhow::Result<()> {
        crate::threads::register_current();
        let socket = match self.socket {
            Some(s) => s,
            None => paths::default_socket(&self.config.library)?,
        };
        let (exit_tx, exit_rx) = mpsc::channel::<Exit>();
        // Signals first: a Ctrl-C during the first load is a clean exit too.
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])
        .context("installing the signal handlers")?;
        let signal_handle = signals.handle();
        {
            let exit_tx = exit_tx.clone();
            crate::threads::spawn("keepwarm-signals", None, move || {
                if let Some(signal) = signals.forever().next() {
                    let _ = exit_tx.send(Exit::Signal(signal));
                }
            })
            .context("spawning the signal thread")?;
        }
        // Bind before loading: a second host on the same socket stops here.
        let (server, worker) = match self.worker {
            Some(mut w) => (Server::inherited(&socket, w.take_listener()), Some(w)),
            None => (Server::bind(&socket)?, None),
        };
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
        started(&host)?;
        if let Some(worker) = &worker {
            worker.ready();
        }
        let wants_prompt = worker.is_none() && !self.no_repl && std::io::stdin().is_terminal();
        let terminal = TerminalState::save();
        if wants_prompt && owns_terminal() {
            let backend: Arc<dyn crate::repl::Backend> =
                Arc::new(crate::repl::Local(Arc::clone(&host)));
            let exit_tx = exit_tx.clone();
            crate::threads::spawn(
                "keepwarm-prompt",
                Some(crate::repl::PROMPT_STACK_BYTES),
                move || {
                    if let Err(e) = crate::repl::run(backend) {
                        crate::output::err(&format!("keepwarm: the prompt failed: {e}"));
                    }
                    let _ = exit_tx.send(Exit::Quit);
                },
            )
            .context("spawning the prompt")?;
        } else if wants_prompt {
            crate::output::say(
                "keepwarm: running in the background, so no prompt (as with --no-repl); use `keepwarm call …` from any terminal; stop it with `kill %1`",
            );
        }
        drop(exit_tx);
        let reason = exit_rx.recv().unwrap_or(Exit::Quit);
        // One path out, whatever the reason.
        terminal.restore();
        drop(watch);
        drop(guard);
        if !host.shutdown(SHUTDOWN_GRACE) {
            crate::output::say(&format!(
                "keepwarm: calls still running after {} s; leaving anyway",
                SHUTDOWN_GRACE.as_secs()
            ));
        }
        signal_handle.close();
        if let (Exit::Signal(_), None) = (reason, &worker) {
            crate::output::say("keepwarm: stopped by a signal; shut down cleanly");
        }
        Ok(())
    }
}
