//! Watching the library file and turning a build's burst of file events into
//! one reload.
//!
//! The watch is on directories, never on the file: cargo replaces the file
//! (a new inode via hard link or rename), and a watch on the old inode would
//! go stale. Three kinds of path are watched, and recomputed after every
//! event, so that the watch follows what the path means now:
//! - the library path itself, and, when it is a symlink, every hop of the
//!   link and the file it finally names (a rebuild of the target, or the
//!   link pointed elsewhere, both reload);
//! - for a path whose directory is gone (`cargo clean`), the nearest
//!   existing ancestor: when the directory comes back, the watch moves down
//!   to it, and the next build loads.
//!
//! Any event naming one of those paths wakes the loop, which drains the rest
//! of the burst and asks the host to reload. The host compares content
//! hashes, so the further events of the same build find nothing new.
//!
//! What keeps a file that is still being written from being loaded:
//! - while the file is open for writing in place (a data-modify event
//!   without the close-after-write that ends it), the loop waits for the
//!   close, or for [`WRITER_QUIET`] without events from a writer that never
//!   closes (an mmap writer);
//! - the loader refuses, as *incomplete*, a file some process still has open
//!   for writing, one that changed while it was read, and one whose ELF
//!   tables do not end exactly at its end (truncated, or a shorter build
//!   written over a longer one and not truncated yet); such a file is
//!   retried every [`RETRY_INTERVAL`] and reported only after
//!   [`INCOMPLETE_TIMEOUT`];
//! - a failure of the machine rather than the file (no space for the shadow
//!   copy, an I/O error) is reported once and retried every
//!   [`TRANSIENT_RETRY`] until it loads or a new build lands.
//!
//! An atomic replacement (cargo's hard link, `mv`) produces no data-modify
//! event, so it loads at the first event: no fixed debounce delay.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};
use parking_lot::Mutex;

use crate::host::{Host, Plugin};
use crate::loader::LoadError;

/// How often an incomplete file is checked again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(5);
/// How long a file may stay incomplete before it is reported as broken.
pub const INCOMPLETE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a writer that opened the file in place may stay silent before
/// the file is read anyway.
pub const WRITER_QUIET: Duration = Duration::from_millis(200);
/// How often a load that failed for want of space (or another machine
/// problem) is tried again.
pub const TRANSIENT_RETRY: Duration = Duration::from_secs(1);

/// How long the library may be missing before the host says it waits for
/// it: cargo removes the old file and links the new one in its place, so a
/// normal rebuild has it missing for an instant.
pub const MISSING_GRACE: Duration = Duration::from_millis(1000);

/// Most symlink hops followed (as the kernel's limit).
const MAX_HOPS: usize = 40;

/// Why the watch could not start.
#[derive(Debug)]
pub struct WatchError(String);

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WatchError {}

/// A running watch (of one plugin, or of all of a host's); dropping it
/// stops watching and waits for its threads.
pub struct Watch {
    stop: Option<mpsc::Sender<Signal>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The watches of the other plugins ([`watch`] of several).
    others: Vec<Watch>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Signal::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a file event says about the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// It may have changed (created, renamed over, attributes, unknown), or
    /// a directory on its way did.
    Changed,
    /// Someone is writing into it in place.
    Writing,
    /// A writer closed it.
    Closed,
    /// The watch was dropped.
    Stop,
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

/// The paths whose changes matter: the library path, the hops of its
/// symlinks and their final target. Lexical (no canonicalization of the
/// directories), the way the user wrote them.
fn wanted_paths(library: &Path) -> Vec<PathBuf> {
    let mut paths = vec![library.to_owned()];
    let mut current = library.to_owned();
    for _ in 0..MAX_HOPS {
        let Ok(target) = std::fs::read_link(&current) else {
            break;
        };
        let dir = current.parent().unwrap_or(Path::new("/"));
        let next = std::path::absolute(dir.join(target)).unwrap_or_default();
        if paths.contains(&next) {
            break; // a loop: the loader will say so
        }
        paths.push(next.clone());
        current = next;
    }
    if let Ok(real) = std::fs::canonicalize(library) {
        if !paths.contains(&real) {
            paths.push(real);
        }
    }
    paths
}

/// The directory to watch for `path`: its parent, or the nearest ancestor
/// that exists when the parent does not (yet).
fn watch_dir_for(path: &Path) -> PathBuf {
    let mut dir = path.parent().unwrap_or(Path::new("/")).to_owned();
    while !dir.is_dir() {
        match dir.parent() {
            Some(up) => dir = up.to_owned(),
            None => return PathBuf::from("/"),
        }
    }
    dir
}

/// What the event filter matches against, updated on every re-arm.
#[derive(Default)]
struct Interest {
    /// The files themselves (writer events count for these).
    files: Vec<PathBuf>,
    /// Every ancestor directory of those files, down from a watched one.
    ancestors: Vec<PathBuf>,
}

impl Interest {
    fn of(paths: &[PathBuf]) -> Interest {
        let mut ancestors = Vec::new();
        for p in paths {
            let mut a = p.parent();
            while let Some(dir) = a {
                if !ancestors.iter().any(|x: &PathBuf| x == dir) {
                    ancestors.push(dir.to_owned());
                }
                a = dir.parent();
            }
        }
        Interest {
            files: paths.to_vec(),
            ancestors,
        }
    }

    fn signal(&self, event: &notify::Event) -> Option<Signal> {
        if event.paths.is_empty() {
            return classify(&event.kind);
        }
        if event.paths.iter().any(|p| self.files.contains(p)) {
            return classify(&event.kind);
        }
        // A directory on the way was created, removed or renamed.
        let on_the_way = event.paths.iter().any(|p| self.ancestors.contains(p));
        match (on_the_way, &event.kind) {
            (true, EventKind::Access(_)) | (false, _) => None,
            (true, _) => Some(Signal::Changed),
        }
    }
}

/// The watcher and the directories it watches now.
struct Arm {
    watcher: notify::RecommendedWatcher,
    interest: Arc<Mutex<Interest>>,
    /// Watched directories, with the inode each had when it was watched.
    watched: std::collections::BTreeMap<PathBuf, u64>,
    library: PathBuf,
}

fn inode(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

impl Arm {
    /// Re-computes the paths that matter and moves the watches to them.
    fn rearm(&mut self) {
        // A directory created between computing the watch and placing it
        // sends no event to the watch placed above it: place the watches
        // again until what is watched is what exists.
        for _ in 0..16 {
            if !self.rearm_once() {
                break;
            }
        }
    }

    /// One pass of [`Arm::rearm`]; true when the watched set changed.
    fn rearm_once(&mut self) -> bool {
        let paths = wanted_paths(&self.library);
        let dirs: BTreeSet<PathBuf> = paths.iter().map(|p| watch_dir_for(p)).collect();
        *self.interest.lock() = Interest::of(&paths);
        let mut watched = std::collections::BTreeMap::new();
        for (dir, ino) in std::mem::take(&mut self.watched) {
            if dirs.contains(&dir) && inode(&dir) == Some(ino) {
                watched.insert(dir, ino);
            } else {
                let _ = self.watcher.unwatch(&dir);
            }
        }
        for dir in dirs {
            // A directory watched before stays watched; one that was removed
            // and recreated (a new inode) is watched again.
            if watched.contains_key(&dir) {
                continue;
            }
            let Some(ino) = inode(&dir) else { continue };
            if self
                .watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .is_ok()
            {
                watched.insert(dir, ino);
            }
        }
        let changed = watched != self.watched;
        self.watched = watched;
        changed
    }
}

/// Starts watching every library of `host`, one background thread each.
pub fn watch(host: Arc<Host>) -> Result<Watch, WatchError> {
    let mut plugins = host.plugins().into_iter();
    let first = plugins
        .next()
        .ok_or_else(|| WatchError("the host has no plugin to watch".into()))?;
    let mut watch = watch_plugin(first)?;
    for plugin in plugins {
        watch.others.push(watch_plugin(plugin)?);
    }
    Ok(watch)
}

/// Starts watching one plugin's library on a background thread.
pub fn watch_plugin(host: Arc<Plugin>) -> Result<Watch, WatchError> {
    let (tx, rx) = mpsc::channel::<Signal>();
    let interest = Arc::new(Mutex::new(Interest::default()));
    let events = tx.clone();
    let filter = Arc::clone(&interest);
    let threads_before = crate::threads::alive();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let signal = match event {
            // An overflowed or failed event queue: check the file anyway.
            Err(_) => Some(Signal::Changed),
            Ok(event) => filter.lock().signal(&event),
        };
        if let Some(signal) = signal {
            let _ = events.send(signal);
        }
    })
    .map_err(|e| WatchError(format!("starting the file watcher: {e}")))?;
    // The watcher's own thread is the host's.
    crate::threads::register_new_since(&threads_before);
    let mut arm = Arm {
        watcher,
        interest,
        watched: std::collections::BTreeMap::new(),
        library: host.library().to_owned(),
    };
    arm.rearm();
    if arm.watched.is_empty() {
        return Err(WatchError(format!(
            "cannot watch any directory on the way to {}",
            host.library().display()
        )));
    }
    let thread = crate::threads::spawn("keepwarm-watch", None, move || run(&host, &rx, &mut arm))
        .map_err(|e| WatchError(format!("spawning the watcher thread: {e}")))?;
    Ok(Watch {
        stop: Some(tx),
        thread: Some(thread),
        others: Vec::new(),
    })
}

/// Whether a writer still has the file open, after `signal`.
fn apply(writing: &mut bool, signal: Signal) {
    match signal {
        Signal::Writing => *writing = true,
        Signal::Closed => *writing = false,
        Signal::Changed | Signal::Stop => {}
    }
}

/// What the loop does next after one attempt.
enum Next {
    /// Wait for the next event.
    Wait,
    /// Try again after this long, or at the next event.
    RetryIn(Duration),
}

fn run(host: &Plugin, rx: &mpsc::Receiver<Signal>, arm: &mut Arm) {
    let mut next = Next::Wait;
    let mut missing_since: Option<Instant> = None;
    loop {
        let first = match next {
            Next::Wait => match rx.recv() {
                Ok(s) => s,
                Err(_) => return,
            },
            Next::RetryIn(after) => match rx.recv_timeout(after) {
                Ok(s) => s,
                Err(mpsc::RecvTimeoutError::Timeout) => Signal::Changed,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        if first == Signal::Stop {
            return;
        }
        let mut writing = false;
        apply(&mut writing, first);
        match attempt(host, rx, arm, &mut writing, &mut missing_since) {
            Some(n) => next = n,
            None => return,
        }
    }
}

/// Re-arms, waits out writers and incomplete files, and reloads. `None`
/// when the watch was stopped.
fn attempt(
    host: &Plugin,
    rx: &mpsc::Receiver<Signal>,
    arm: &mut Arm,
    writing: &mut bool,
    missing_since: &mut Option<Instant>,
) -> Option<Next> {
    let mut incomplete_since: Option<Instant> = None;
    loop {
        arm.rearm();
        while let Ok(signal) = rx.try_recv() {
            if signal == Signal::Stop {
                return None;
            }
            apply(writing, signal);
        }
        if *writing {
            match rx.recv_timeout(WRITER_QUIET) {
                Ok(Signal::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Ok(signal) => apply(writing, signal),
                // The writer went quiet without closing: try the file.
                Err(mpsc::RecvTimeoutError::Timeout) => *writing = false,
            }
            continue;
        }
        match host.reload(false) {
            Err(e) if e.is_incomplete() => {
                let since = *incomplete_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= INCOMPLETE_TIMEOUT {
                    host.report_failure(&e);
                    return Some(Next::Wait);
                }
                // Poll fast at first (a copy finishing), then gently.
                let pause = if since.elapsed() < Duration::from_millis(100) {
                    RETRY_INTERVAL
                } else {
                    RETRY_INTERVAL * 10
                };
                match rx.recv_timeout(pause) {
                    Ok(Signal::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                    Ok(signal) => apply(writing, signal),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
            Err(LoadError::Missing(_)) => {
                let since = *missing_since.get_or_insert_with(Instant::now);
                let missing = since.elapsed();
                if missing >= MISSING_GRACE {
                    host.set_waiting(true);
                    return Some(Next::Wait);
                }
                // Look again once the grace is over, unless it comes back first.
                return Some(Next::RetryIn(MISSING_GRACE - missing));
            }
            Err(e) if e.is_transient() => {
                *missing_since = None;
                host.report_transient(&e);
                return Some(Next::RetryIn(TRANSIENT_RETRY));
            }
            // Loaded, unchanged, or refused (the host reported it).
            Ok(_) | Err(_) => {
                *missing_since = None;
                return Some(Next::Wait);
            }
        }
    }
}

/// The first load of `keepwarm run`, of every plugin: waits out a file that
/// is still being written; a missing file is announced and left to the
/// watcher, and so is a machine problem (reported, then retried by the
/// watcher).
pub fn load_initial(host: &Host) {
    for plugin in host.plugins() {
        load_initial_plugin(&plugin);
    }
}

/// [`load_initial`] of one plugin.
pub(crate) fn load_initial_plugin(host: &Plugin) {
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
            Err(LoadError::Missing(_)) => {
                host.set_waiting(true);
                return;
            }
            Err(e) if e.is_transient() => {
                host.report_transient(&e);
                return;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_chain_is_followed_to_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("build/libp.so");
        std::fs::create_dir_all(real.parent().unwrap()).unwrap();
        std::fs::write(&real, b"x").unwrap();
        let hop = dir.path().join("hop.so");
        std::os::unix::fs::symlink("build/libp.so", &hop).unwrap();
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink(&hop, &link).unwrap();
        let paths = wanted_paths(&link);
        assert_eq!(paths[..3], [link.clone(), hop, real.clone()]);
    }

    #[test]
    fn a_missing_directory_is_watched_from_its_nearest_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("target/debug/libp.so");
        assert_eq!(watch_dir_for(&lib), dir.path());
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        assert_eq!(watch_dir_for(&lib), lib.parent().unwrap());
    }
}
