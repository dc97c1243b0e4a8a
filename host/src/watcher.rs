//! Watching the library file and turning a build's burst of file events into
//! one reload.
//!
//! The watch is on the library's *directory*: cargo replaces the file (a new
//! inode via hard link or rename), and a watch on the old inode would go
//! stale. Any event naming the file wakes the loop, which drains the rest of
//! the burst and asks the host to reload. The host compares content hashes,
//! so the further events of the same build find nothing new. A file that is
//! still being written (the loader's completeness check says so) is retried
//! every [`RETRY_INTERVAL`] until it is complete, and reported as broken only
//! after [`INCOMPLETE_TIMEOUT`].

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::host::Host;

/// How often an incomplete file is checked again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(5);
/// How long a file may stay incomplete before it is reported as broken.
pub const INCOMPLETE_TIMEOUT: Duration = Duration::from_secs(3);

/// A running watch; dropping it stops watching.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

fn is_relevant(kind: &EventKind) -> bool {
    match kind {
        // Our own reads of the file must not wake us again.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts watching `host`'s library on a background thread.
pub fn watch(host: Arc<Host>) -> anyhow::Result<Watch> {
    let library = host.library().to_owned();
    let dir = library.parent().unwrap_or(Path::new("/")).to_owned();
    let name = library.file_name().map(|n| n.to_owned());
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An overflowed or failed event queue: check the file anyway.
            let _ = tx.send(());
            return;
        };
        if is_relevant(&event.kind)
            && (event.paths.is_empty()
                || event.paths.iter().any(|p| p.file_name() == name.as_deref()))
        {
            let _ = tx.send(());
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

fn drain(rx: &mpsc::Receiver<()>) {
    while rx.try_recv().is_ok() {}
}

fn run(host: &Host, rx: &mpsc::Receiver<()>) {
    // recv fails only when the watcher (the sender) is dropped: stop then.
    while rx.recv().is_ok() {
        drain(rx);
        let mut incomplete_since: Option<Instant> = None;
        loop {
            match host.reload(false) {
                Err(e) if e.is_incomplete() => {
                    let since = *incomplete_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= INCOMPLETE_TIMEOUT {
                        host.report_failure(&e);
                        break;
                    }
                    // Wait for the next event or the retry interval, whichever
                    // comes first.
                    match rx.recv_timeout(RETRY_INTERVAL) {
                        Ok(()) => drain(rx),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // Deleted: keep serving and keep watching; a new file wakes us.
                Err(crate::loader::LoadError::Missing(_)) => break,
                // Other failures were reported by the host.
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
