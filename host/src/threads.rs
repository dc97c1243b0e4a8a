//! Which threads are the host's, so that a generation whose plugin left a
//! thread running is never unmapped under that thread.
//!
//! Unmapping a library while one of its threads still runs its code kills
//! the process (and every cache with it) the next time that thread is
//! scheduled. The host cannot ask a thread who started it, so it keeps the
//! inverse: the threads it started itself, those of the application
//! embedding it (each thread that calls a plugin through the host registers
//! on its first call), and the threads present before a library was opened.
//! Any other thread alive when a generation retires may be the plugin's: the
//! generation's code then stays mapped for the life of the process.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

static HOST_THREADS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Host threads created but not registered yet: a census waits for them,
/// so a thread caught between its creation and its registration is never
/// taken for a plugin's.
static SPAWNING: AtomicUsize = AtomicUsize::new(0);

/// A host thread on its way: made by [`Spawning::begin`] in the parent,
/// moved into the new thread, which calls [`Spawning::registered`] once it
/// has registered (or it is dropped, if the thread could not be made).
pub struct Spawning(bool);

impl Spawning {
    /// Announces a host thread about to be created.
    pub fn begin() -> Spawning {
        SPAWNING.fetch_add(1, Ordering::SeqCst);
        Spawning(true)
    }

    /// Registers the calling (new) thread and ends the announcement.
    pub fn registered(mut self) {
        register_current();
        self.end();
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.0) {
            SPAWNING.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Spawning {
    fn drop(&mut self) {
        self.end();
    }
}

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// This thread's kernel id.
pub fn tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Records the calling thread as the host's (cheap after the first call).
pub fn register_current() {
    if !REGISTERED.with(Cell::get) {
        HOST_THREADS.lock().insert(tid());
        REGISTERED.with(|r| r.set(true));
    }
}

/// The ids of the process's threads now.
pub fn alive() -> BTreeSet<i32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/task") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Records as the host's the threads that appeared since `before` (for
/// threads that a library the host uses starts, such as the file watcher's).
pub fn register_new_since(before: &BTreeSet<i32>) {
    let now = alive();
    HOST_THREADS.lock().extend(now.difference(before));
}

/// The threads alive now that were not alive at `before` and are not the
/// host's: those a library opened after `before` may have started.
pub fn foreign_since(before: &BTreeSet<i32>) -> Vec<i32> {
    // Let host threads on their way register first (bounded: a thread
    // that cannot start within a second is judged as it is).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while SPAWNING.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let now = alive();
    let mut host = HOST_THREADS.lock();
    // Forget threads that exited, so a reused id is never taken for ours.
    host.retain(|t| now.contains(t));
    now.iter()
        .filter(|t| !before.contains(t) && !host.contains(t))
        .copied()
        .collect()
}

/// Spawns a named host thread (registered before it runs `f`).
pub fn spawn<T: Send + 'static>(
    name: &str,
    stack: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let mut builder = std::thread::Builder::new().name(name.to_owned());
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    let spawning = Spawning::begin();
    builder.spawn(move || {
        spawning.registered();
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_nobody_registered_is_foreign_and_a_registered_one_is_not() {
        register_current();
        let before = alive();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let stranger = std::thread::spawn(move || {
            tid_tx.send(tid()).unwrap();
            let _ = stop_rx.recv();
        });
        let stranger_tid = tid_rx.recv().unwrap();
        let (ours_tx, ours_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let ours = spawn("test-ours", None, move || {
            ours_tx.send(tid()).unwrap();
            let _ = release_rx.recv();
        })
        .unwrap();
        let ours_tid = ours_rx.recv().unwrap();
        let foreign = foreign_since(&before);
        assert!(foreign.contains(&stranger_tid), "{foreign:?}");
        assert!(!foreign.contains(&ours_tid), "{foreign:?}");
        drop(stop_tx);
        drop(release_tx);
        stranger.join().unwrap();
        ours.join().unwrap();
    }
}
