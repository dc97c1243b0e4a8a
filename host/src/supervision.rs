//! What a supervisor needs from the process that runs plugin code, to
//! survive that process's death.
//!
//! `keepwarm run` is two processes: the one the user started (the
//! *supervisor*: it owns the terminal, the control socket's listening
//! descriptor and the memory that outlives a crash) and a *worker* it
//! starts, which loads the plugins and serves the socket. A plugin that
//! segfaults kills the worker only; the supervisor starts a new one.
//!
//! This module holds the parts that live in the runtime library:
//!
//! - [`BlackBox`]: a page of shared memory (a memfd the supervisor creates
//!   and the worker inherits) where the worker notes, at memory speed, what
//!   it is doing: which build it is loading, which generation is live and
//!   since when, and the functions of the calls running now. The worker
//!   writes it; the supervisor reads it only after the worker is dead, to
//!   say what crashed and to judge whether the build is bad.
//! - [`Supervised`]: what the supervisor tells a worker it starts (the build
//!   to start on, the builds not to load, the crashes so far), set in
//!   [`crate::Config::supervised`].
//! - [`Crash`] and [`BadBuild`]: how `status --json` reports them.
//!
//! The supervisor itself (spawning, waiting, restarting) is part of the
//! `keepwarm` binary, not of this library: an application embedding the
//! library runs plugin code in its own process and gets no crash
//! containment (see `docs/RELIABILITY.md`).
//!
//! ```
//! use keepwarm::supervision::BlackBox;
//!
//! let black_box = BlackBox::create().unwrap();
//! let note = black_box.call_started("segv", 3);
//! let seen = black_box.snapshot();
//! assert_eq!(seen.calls, vec![("segv".to_owned(), 3)]);
//! drop(note);
//! assert!(black_box.snapshot().calls.is_empty());
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use serde_json::json;

/// Calls the black box can name at once; more run unnamed.
pub const SLOTS: usize = 64;
/// Bytes of a function name kept in a slot.
pub const NAME_BYTES: usize = 48;

const MAGIC: u64 = 0x6b77_626c_6163_6b31; // "kwblack1"

/// Phase: starting, or between loads.
const IDLE: u64 = 0;
/// Phase: a build is being loaded (its `on_load` may be running).
const LOADING: u64 = 1;

#[repr(C)]
struct Slot {
    /// 0: free; otherwise the generation the call runs on.
    generation: AtomicU64,
    name_len: AtomicU64,
    name: [AtomicU8; NAME_BYTES],
}

#[repr(C)]
struct Page {
    magic: AtomicU64,
    phase: AtomicU64,
    loading_generation: AtomicU64,
    loading_hash: AtomicU64,
    live_generation: AtomicU64,
    live_hash: AtomicU64,
    live_since_ms: AtomicU64,
    max_generation: AtomicU64,
    /// Calls that found no free slot.
    unnamed: AtomicU64,
    slots: [Slot; SLOTS],
}

/// A page of shared memory that outlives the worker (see the module docs).
pub struct BlackBox {
    fd: OwnedFd,
    page: &'static Page,
}

/// What the black box held when it was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The build being loaded (generation, content hash), if a load was
    /// under way.
    pub loading: Option<(u64, u32)>,
    /// The live build of the first plugin: generation, content hash, and
    /// when it went live (Unix milliseconds).
    pub live: Option<(u64, u32, u64)>,
    /// The calls running: function and generation.
    pub calls: Vec<(String, u64)>,
    /// Calls running that had no slot to be named in.
    pub unnamed: u64,
    /// The highest generation number the worker used.
    pub max_generation: u64,
}

fn page_len() -> usize {
    std::mem::size_of::<Page>().next_multiple_of(4096)
}

impl BlackBox {
    /// A new, empty black box (the supervisor's).
    pub fn create() -> std::io::Result<BlackBox> {
        let fd = memfd(c"keepwarm-black-box", page_len() as u64)?;
        let black_box = BlackBox::map(fd)?;
        black_box.page.magic.store(MAGIC, Ordering::Release);
        Ok(black_box)
    }

    /// The black box the supervisor handed this process as descriptor `fd`.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that nothing else in this process
    /// owns (it is closed when the black box is dropped), and it must be a
    /// black box made by [`BlackBox::create`].
    pub unsafe fn from_raw_fd(fd: RawFd) -> std::io::Result<BlackBox> {
        // SAFETY: the caller hands over ownership of `fd`.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let black_box = BlackBox::map(fd)?;
        if black_box.page.magic.load(Ordering::Acquire) != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the descriptor is not a keepwarm black box",
            ));
        }
        Ok(black_box)
    }

    fn map(fd: OwnedFd) -> std::io::Result<BlackBox> {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `stat` for an open descriptor.
        if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstat returned 0, so `stat` is initialized.
        let size = unsafe { stat.assume_init() }.st_size as usize;
        if size < page_len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the black box is smaller than its page",
            ));
        }
        // SAFETY: a shared read-write mapping of the first page_len() bytes
        // of a file at least that long; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the mapping is page aligned, page_len() >= size_of::<Page>(),
        // every field of Page is an atomic for which all-zero bytes (a new
        // memfd) are a valid value, and the mapping is never unmapped (it
        // is leaked with the 'static reference), so the reference stays valid.
        let page = unsafe { &*(ptr as *const Page) };
        Ok(BlackBox { fd, page })
    }

    /// The descriptor, to hand to a worker (see [`BlackBox::inheritable`]).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Lets a process started from this one inherit the descriptor.
    pub fn inheritable(&self) -> std::io::Result<()> {
        clear_cloexec(self.fd.as_raw_fd())
    }

    /// Forgets what a dead worker wrote, before the next one starts (the
    /// highest generation number is kept).
    pub fn clear(&self) {
        let p = self.page;
        p.phase.store(IDLE, Ordering::Release);
        p.loading_generation.store(0, Ordering::Release);
        p.loading_hash.store(0, Ordering::Release);
        p.live_generation.store(0, Ordering::Release);
        p.live_hash.store(0, Ordering::Release);
        p.live_since_ms.store(0, Ordering::Release);
        p.unnamed.store(0, Ordering::Release);
        for slot in &p.slots {
            slot.generation.store(0, Ordering::Release);
        }
    }

    /// What the black box holds now.
    pub fn snapshot(&self) -> Snapshot {
        let p = self.page;
        let loading = (p.phase.load(Ordering::Acquire) == LOADING).then(|| {
            (
                p.loading_generation.load(Ordering::Acquire),
                p.loading_hash.load(Ordering::Acquire) as u32,
            )
        });
        let live_generation = p.live_generation.load(Ordering::Acquire);
        let live = (live_generation != 0).then(|| {
            (
                live_generation,
                p.live_hash.load(Ordering::Acquire) as u32,
                p.live_since_ms.load(Ordering::Acquire),
            )
        });
        let mut calls = Vec::new();
        for slot in &p.slots {
            let generation = slot.generation.load(Ordering::Acquire);
            if generation == 0 || generation == u64::MAX {
                continue;
            }
            let len = (slot.name_len.load(Ordering::Acquire) as usize).min(NAME_BYTES);
            let name: Vec<u8> = slot.name[..len]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            calls.push((String::from_utf8_lossy(&name).into_owned(), generation));
        }
        Snapshot {
            loading,
            live,
            calls,
            unnamed: p.unnamed.load(Ordering::Acquire),
            max_generation: p.max_generation.load(Ordering::Acquire),
        }
    }

    /// Notes a call until the returned guard drops.
    pub fn call_started(&self, function: &str, generation: u64) -> CallNote<'_> {
        let generation = generation.max(1);
        for (i, slot) in self.page.slots.iter().enumerate() {
            // u64::MAX: claimed, being written.
            if slot
                .generation
                .compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let name = function.as_bytes();
                let len = name.len().min(NAME_BYTES);
                for (cell, byte) in slot.name.iter().zip(&name[..len]) {
                    cell.store(*byte, Ordering::Relaxed);
                }
                slot.name_len.store(len as u64, Ordering::Release);
                slot.generation.store(generation, Ordering::Release);
                return CallNote {
                    black_box: self,
                    slot: Some(i),
                };
            }
        }
        self.page.unnamed.fetch_add(1, Ordering::AcqRel);
        CallNote {
            black_box: self,
            slot: None,
        }
    }

    fn loading(&self, generation: u64, hash: u32) {
        let p = self.page;
        p.loading_generation.store(generation, Ordering::Release);
        p.loading_hash.store(u64::from(hash), Ordering::Release);
        p.max_generation.fetch_max(generation, Ordering::AcqRel);
        p.phase.store(LOADING, Ordering::Release);
    }

    fn load_over(&self, live: Option<(u64, u32)>) {
        let p = self.page;
        if let Some((generation, hash)) = live {
            p.live_hash.store(u64::from(hash), Ordering::Release);
            p.live_since_ms
                .store(crate::persist::now_ms(), Ordering::Release);
            p.live_generation.store(generation, Ordering::Release);
        }
        p.phase.store(IDLE, Ordering::Release);
    }
}

/// Keeps a call named in the black box while it runs.
pub struct CallNote<'a> {
    black_box: &'a BlackBox,
    slot: Option<usize>,
}

impl Drop for CallNote<'_> {
    fn drop(&mut self) {
        match self.slot {
            Some(i) => self.black_box.page.slots[i]
                .generation
                .store(0, Ordering::Release),
            None => {
                self.black_box.page.unnamed.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// A new memfd of `len` bytes (sparse: they read as zero and take no memory
/// until written), closed on exec.
pub(crate) fn memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and
    // returns a new descriptor or -1.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: ftruncate on our own memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own change only its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lets a process started from this one inherit `fd` (the listening
/// socket, the journal): clears its close-on-exec flag.
pub fn make_inheritable(fd: RawFd) -> std::io::Result<()> {
    clear_cloexec(fd)
}

static INSTALLED: OnceLock<BlackBox> = OnceLock::new();

/// Makes `black_box` the one this process's hosts write to (a worker does
/// this once, before it loads anything).
pub fn install(black_box: BlackBox) {
    let _ = INSTALLED.set(black_box);
}

/// Notes a call in the installed black box, if there is one.
pub(crate) fn note_call(function: &str, generation: u64) -> Option<CallNote<'static>> {
    INSTALLED
        .get()
        .map(|b| b.call_started(function, generation))
}

/// Notes that the first plugin's build `hash` is being loaded as `generation`.
pub(crate) fn note_loading(generation: u64, hash: u32) {
    if let Some(b) = INSTALLED.get() {
        b.loading(generation, hash);
    }
}

/// Notes that the load is over, and what went live if it succeeded.
pub(crate) fn note_load_over(live: Option<(u64, u32)>) {
    if let Some(b) = INSTALLED.get() {
        b.load_over(live);
    }
}

/// A crash of the worker, as `status --json` shows it in `last_crash`.
#[derive(Debug, Clone, PartialEq)]
pub struct Crash {
    /// The signal that killed it (`SIGSEGV`), or how it ended otherwise
    /// (`exit status 3`).
    pub signal: String,
    /// The function whose call was running, when one was (several: the
    /// first, and `others` counts the rest).
    pub function: Option<String>,
    /// Other calls that were running.
    pub others: u64,
    /// The generation that crashed (0: none was loaded).
    pub generation: u64,
    /// When, in seconds since the Unix epoch.
    pub time: f64,
    /// Whether the crash happened while a build was loading (in its
    /// `on_load`).
    pub in_load: bool,
    /// The generation the host restarted on (`None`: none could load; the
    /// host waits for the next build).
    pub restarted_on: Option<u64>,
}

impl Crash {
    /// What crashed, as the crash line and the CLI say it:
    /// `SIGSEGV in segv() (generation 3)`.
    pub fn what(&self) -> String {
        let place = match (&self.function, self.in_load) {
            (_, true) => " in on_load".to_owned(),
            (Some(f), false) if self.others > 0 => {
                format!(" in {f}() or one of {} other call(s)", self.others)
            }
            (Some(f), false) => format!(" in {f}()"),
            (None, false) => " with no call running".to_owned(),
        };
        format!("{}{place} (generation {})", self.signal, self.generation)
    }

    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "signal": self.signal,
            "function": self.function,
            "others": self.others,
            "generation": self.generation,
            "time": self.time,
            "in_load": self.in_load,
            "restarted_on": self.restarted_on,
        })
    }

    /// From that JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<Crash, String> {
        let o = crate::json::Object::new(
            value,
            "a crash",
            &[
                "signal",
                "function",
                "others",
                "generation",
                "time",
                "in_load",
                "restarted_on",
            ],
        )?;
        Ok(Crash {
            signal: o.str("signal")?,
            function: o.opt_str("function")?,
            others: o.opt_u64("others")?.unwrap_or(0),
            generation: o.u64("generation")?,
            time: o.opt_f64("time")?.unwrap_or(0.0),
            in_load: o.bool_or_false("in_load")?,
            restarted_on: o.opt_u64("restarted_on")?,
        })
    }
}

/// A build that is not loaded again until the file changes.
#[derive(Debug, Clone, PartialEq)]
pub struct BadBuild {
    /// The content hash of its bytes (crc32, as the loader computes it).
    pub hash: u32,
    /// The generation number it had.
    pub generation: u64,
    /// How it crashed.
    pub why: String,
}

impl BadBuild {
    /// As a JSON object (`hash` as 8 hex digits).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "hash": format!("{:08x}", self.hash),
            "generation": self.generation,
            "why": self.why,
        })
    }

    /// From that JSON object.
    pub fn from_json(value: &serde_json::Value) -> Result<BadBuild, String> {
        let o = crate::json::Object::new(value, "a bad build", &["hash", "generation", "why"])?;
        let hash = o.str("hash")?;
        Ok(BadBuild {
            hash: u32::from_str_radix(&hash, 16)
                .map_err(|e| format!("a bad build's hash {hash:?}: {e}"))?,
            generation: o.u64("generation")?,
            why: o.str("why")?,
        })
    }
}

/// What a supervisor tells the worker it starts.
#[derive(Debug, Clone, Default)]
pub struct Supervised {
    /// Load the first plugin from this copy of a build that worked (not
    /// from the watched path), as this generation number.
    pub start_from: Option<(PathBuf, u64)>,
    /// The number the next new build gets.
    pub next_generation: u64,
    /// Builds not to load until the file changes (or a forced reload).
    pub bad_builds: Vec<BadBuild>,
    /// Each build of the first plugin that loads is linked here as
    /// `gen-N-HASH.so` (the newest few are kept), so a restart can start on
    /// the last one that worked.
    pub keep_builds: Option<PathBuf>,
    /// The supervisor's PID (what `status` shows as `pid`).
    pub supervisor_pid: u32,
    /// Restarts so far.
    pub restarts: u64,
    /// The last crash.
    pub last_crash: Option<Crash>,
}

/// The name a kept build has in [`Supervised::keep_builds`].
pub fn kept_build_name(generation: u64, hash: u32) -> String {
    format!("gen-{generation}-{hash:08x}.so")
}

/// The kept builds in `dir`: (generation, hash, path), newest first.
pub fn kept_builds(dir: &std::path::Path) -> Vec<(u64, u32, PathBuf)> {
    let mut found: Vec<(u64, u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("gen-")?.strip_suffix(".so")?;
            let (generation, hash) = rest.split_once('-')?;
            Some((
                generation.parse().ok()?,
                u32::from_str_radix(hash, 16).ok()?,
                e.path(),
            ))
        })
        .collect();
    found.sort_by_key(|k| std::cmp::Reverse(k.0));
    found
}

/// Builds kept besides the live one.
const KEPT: usize = 3;

/// Links the shadow copy of a build that just loaded into `dir`, and drops
/// the oldest beyond the few kept. Failures only cost the chance to
/// restart on this build, so they are ignored.
pub(crate) fn keep_build(
    dir: &std::path::Path,
    shadow: &std::path::Path,
    generation: u64,
    hash: u32,
) {
    let target = dir.join(kept_build_name(generation, hash));
    if std::fs::hard_link(shadow, &target).is_err() {
        let partial = dir.join(format!(".partial-{generation}"));
        if std::fs::copy(shadow, &partial).is_ok() {
            let _ = std::fs::rename(&partial, &target);
        }
        let _ = std::fs::remove_file(&partial);
    }
    for (_, _, old) in kept_builds(dir).into_iter().skip(KEPT) {
        let _ = std::fs::remove_file(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_worker_writes_is_read_through_another_mapping() {
        let supervisor = BlackBox::create().unwrap();
        // SAFETY: dup gives a new descriptor that the worker side owns.
        let dup = unsafe { libc::dup(supervisor.raw_fd()) };
        // SAFETY: `dup` is ours and is a black box.
        let worker = unsafe { BlackBox::from_raw_fd(dup) }.unwrap();
        worker.loading(4, 0xdead_beef);
        assert_eq!(supervisor.snapshot().loading, Some((4, 0xdead_beef)));
        worker.load_over(Some((4, 0xdead_beef)));
        let seen = supervisor.snapshot();
        assert_eq!(seen.loading, None);
        assert_eq!(seen.live.map(|l| (l.0, l.1)), Some((4, 0xdead_beef)));
        assert_eq!(seen.max_generation, 4);
        let notes: Vec<_> = (0..SLOTS + 2)
            .map(|i| worker.call_started(&format!("f{i}"), 4))
            .collect();
        let seen = supervisor.snapshot();
        assert_eq!(seen.calls.len(), SLOTS);
        assert_eq!(seen.unnamed, 2);
        drop(notes);
        let long = "x".repeat(100);
        let _n = worker.call_started(&long, 4);
        assert_eq!(supervisor.snapshot().calls[0].0.len(), NAME_BYTES);
        supervisor.clear();
        assert_eq!(supervisor.snapshot().live, None);
        assert_eq!(supervisor.snapshot().max_generation, 4);
    }

    #[test]
    fn crashes_and_bad_builds_round_trip_through_json() {
        let crash = Crash {
            signal: "SIGSEGV".into(),
            function: Some("segv".into()),
            others: 0,
            generation: 3,
            time: 1.5,
            in_load: false,
            restarted_on: Some(3),
        };
        assert_eq!(crash.what(), "SIGSEGV in segv() (generation 3)");
        assert_eq!(Crash::from_json(&crash.to_json()).unwrap(), crash);
        let bad = BadBuild {
            hash: 0x0012_abcd,
            generation: 4,
            why: "SIGSEGV in on_load".into(),
        };
        assert_eq!(bad.to_json()["hash"], "0012abcd");
        assert_eq!(BadBuild::from_json(&bad.to_json()).unwrap(), bad);
    }

    #[test]
    fn kept_builds_are_listed_newest_first_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let shadow = dir.path().join("shadow.so");
        std::fs::write(&shadow, b"build").unwrap();
        let kept = tempfile::tempdir().unwrap();
        for g in 1..=5 {
            keep_build(kept.path(), &shadow, g, g as u32);
        }
        let found = kept_builds(kept.path());
        assert_eq!(found.iter().map(|k| k.0).collect::<Vec<_>>(), vec![5, 4, 3]);
        assert_eq!(std::fs::read(&found[0].2).unwrap(), b"build");
    }
}
