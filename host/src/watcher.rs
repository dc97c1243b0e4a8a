//! Watching the library file and turning a build's burst of file events into
//! one reload.
//!
//! The watch is on the library's *directory*: cargo replaces the file (a new
//! inode via hard link or rename), and a watch on the old inode would go
//! stale. Any event naming the file wakes the loop, which drains the rest of
//! the burst and asks the host to reload. The host compares content hashes,
//! so the further events of the same build find nothing new.
//!
//! Two guards keep a file that is still being written from being loaded:
//! - while the file is open for writing in place (a data-modify event
//!   without the close-after-write that ends it), the loop waits for the
//!   close, or for [`WRITER_QUIET`] without events from a writer that never
//!   closes (an mmap writer);
//! - a file the loader's completeness check calls incomplete (truncated:
//!   `cp` truncates first, then writes from the start) is retried every
//!   [`RETRY_INTERVAL`] until it is complete, and reported as broken only
//!   after [`INCOMPLETE_TIMEOUT`].
//!
//! An atomic replacement (cargo's hard link, `mv`) produces no data-modify
//! event, so it loads at the first event: no fixed debounce delay.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::host::Host;

/// How often an incomplete file is checked again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(5);
/// How long a file may stay incomplete before it is reported as broken.
pub const INCOMPLETE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a writer that opened the file in place may stay silent before
/// the file is read anyway.
pub const WRITER_QUIET: Duration = Duration::from_millis(200);

/// A running watch; dropping it stops watching.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

/// What a file event says about the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// It may have changed (created, renamed over, attributes, unknown).
    Changed,
    /// Someone is writing into it in place.
    Writing,
    /// A writer closed it.
    Closed,
}

fn classify(kind: &EventKind) -> Option<Signal> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Signal::Closed),
        // Our own reads of the file must not wake us again.
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_)) => Some(Signal::Writing),
        _ => Some(Signal::Changed),
    }
}

/// Starts watching `host`'s library on a background thread.
pub fn watch(host: Arc<Host>) -> anyhow::Result<Watch> {
    let library = host.library().to_owned();
    let dir = library.parent().unwrap_or(Path::new("/")).to_owned();
    let name = library.file_name().map(|n| n.to_owned());
    let (tx, rx) = mpsc::channel::<Signal>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An overflowed or failed event queue: check the file anyway.
            let _ = tx.send(Signal::Changed);
            return;
        };
        let ours =
            event.paths.is_empty() || event.paths.iter().any(|p| p.file_name() == name.as_deref());
        if let (true, Some(signal)) = (ours, classify(&event.kind)) {
            let _ = tx.send(signal);
        }
    })
    .context("starting the file watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    std::thread::Builder::new()
        .name("keepwarm-watch".into())
        .spawn(move || run(&host, &rx))
        .context("spawning the watcher thread")?;
    Ok(Watch { _watcher: watcher })
}

/// Whether a writer still has the file open, after `signal`.
fn apply(writing: &mut bool, signal: Signal) {
    match signal {
        Signal::Writing => *writing = true,
        Signal::Closed => *writing = false,
        Signal::Changed => {}
    }
}

fn run(host: &Host, rx: &mpsc::Receiver<Signal>) {
    // recv fails only when the watcher (the sender) is dropped: stop then.
    while let Ok(first) = rx.recv() {
        let mut writing = false;
        apply(&mut writing, first);
        let mut incomplete_since: Option<Instant> = None;
        loop {
            while let Ok(signal) = rx.try_recv() {
                apply(&mut writing, signal);
            }
            if writing {
                match rx.recv_timeout(WRITER_QUIET) {
                    Ok(signal) => apply(&mut writing, signal),
                    // The writer went quiet without closing: try the file.
                    Err(mpsc::RecvTimeoutError::Timeout) => writing = false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            match host.reload(false) {
                Err(e) if e.is_incomplete() => {
                    let since = *incomplete_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= INCOMPLETE_TIMEOUT {
                        host.report_failure(&e);
                        break;
                    }
                    match rx.recv_timeout(RETRY_INTERVAL) {
                        Ok(signal) => apply(&mut writing, signal),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // Deleted: keep serving and keep watching; a new file wakes
                // us. Other failures were reported by the host.
                Ok(_) | Err(_) => break,
            }
        }
    }
}

/// The first load of `keepwarm run`: waits out a file that is still being
/// written; a missing file is announced and left to the watcher.
pub fn load_initial(host: &Host) {
    let started = Instant::now();
    loop {
        match host.reload(false) {
            Err(e) if e.is_incomplete() => {
                if started.elapsed() >= INCOMPLETE_TIMEOUT {
                    host.report_failure(&e);
                    return;
                }
                std::thread::sleep(RETRY_INTERVAL);
            }
            Err(crate::loader::LoadError::Missing(path)) => {
                host.print(&format!(
                    "keepwarm: waiting for {} to be built (cargo build); it loads as soon as it appears",
                    path.display()
                ));
                return;
            }
            _ => return,
        }
    }
}
