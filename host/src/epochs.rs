//! The epoch page of `keepwarm serve`: a small file in the runtime directory
//! that clients map read-only, so they can check a copy of an entry they
//! keep in their own memory against the host's resets with one 8-byte read
//! instead of a round trip over the socket.
//!
//! Layout (native byte order: the host and its clients share the machine;
//! `docs/PROTOCOL.md`, "The epoch page", is the contract):
//!
//! | offset | size | what |
//! | --- | --- | --- |
//! | 0 | 8 | magic `KWEPOCH1` |
//! | 8 | 4 | layout version (1) |
//! | 12 | 4 | number of slots ([`SLOTS`]) |
//! | 16 | 8 | the host instance id (random, never 0; 0 once the host has left) |
//! | 24 | 40 | reserved (zero) |
//! | 64 + 8·i | 8 | the stamp of slot i |
//!
//! A cache gets a slot when a client first opens it (`open` answers its
//! index). Its stamp changes at every reset of the cache and is never 0 for
//! a live cache: `base_i + 2·epoch`, where `base_i` is odd and drawn at
//! random for each host instance, so two instances never share a stamp.
//! Unused slots, and every slot once the host has left, read 0.
//!
//! A new host on the same socket path reuses the file of a host that died
//! without removing it (the same inode), so clients that still map the old
//! one see every stamp change and go back to the host.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::cache::Cache;
use crate::error::{Context, Error, Result};

/// Slots in a page: caches beyond this many get none (their clients ask the
/// host on every call).
pub const SLOTS: usize = 4096;
/// Bytes before the first slot.
pub const HEADER_BYTES: usize = 64;
/// The file's size.
pub const PAGE_BYTES: usize = HEADER_BYTES + 8 * SLOTS;
/// The first 8 bytes of the file.
pub const MAGIC: &[u8; 8] = b"KWEPOCH1";
/// The layout version.
pub const LAYOUT_VERSION: u32 = 1;

/// A host's epoch page.
pub struct EpochPage {
    path: PathBuf,
    file: File,
    instance: u64,
    state: Mutex<Slots>,
}

struct Slots {
    /// Cache name → slot index.
    by_name: HashMap<String, usize>,
    /// Per slot: its random base, and the highest epoch written.
    slots: Vec<(u64, u64)>,
    /// Set by [`EpochPage::close`]: nothing is written any more.
    closed: bool,
}

/// A random 64-bit number from the standard library's per-process random
/// keys (no dependency needed for a value that must only differ between
/// host instances).
fn random_u64(salt: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The page of the host serving `socket`:
/// `RUNTIME/<socket file stem>-<8 hex digits of the crc32 of its absolute path>.epochs`.
pub fn page_path(runtime: &Path, socket: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(socket).context(|| format!("resolving {}", socket.display()))?;
    let stem = absolute
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "serve".into());
    let hash = crc32fast::hash(absolute.as_os_str().as_encoded_bytes());
    Ok(runtime.join(format!("{stem}-{hash:08x}.epochs")))
}

impl EpochPage {
    /// Creates the page at `path` (mode 0600), or takes over the file a
    /// host that died left there, with a new instance id and every slot
    /// cleared. Refuses anything at `path` that is not a regular file of
    /// this user.
    pub fn create(path: &Path) -> Result<EpochPage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .context(|| format!("creating the epoch page {}", path.display()))?;
        let meta = file
            .metadata()
            .context(|| format!("inspecting {}", path.display()))?;
        if !meta.is_file() || meta.uid() != crate::paths::uid() {
            return Err(Error::new(format!(
                "{} is not a regular file of yours; remove it, or start keepwarm serve with another --socket",
                path.display()
            )));
        }
        let instance = random_u64(0) | 1;
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&LAYOUT_VERSION.to_ne_bytes());
        header[12..16].copy_from_slice(&(SLOTS as u32).to_ne_bytes());
        header[16..24].copy_from_slice(&instance.to_ne_bytes());
        let mut page = vec![0u8; PAGE_BYTES];
        page[..HEADER_BYTES].copy_from_slice(&header);
        file.set_len(PAGE_BYTES as u64)
            .and_then(|()| file.write_all_at(&page, 0))
            .context(|| format!("writing the epoch page {}", path.display()))?;
        let slots = (0..SLOTS as u64)
            .map(|i| (random_u64(i + 1) | 1, 0))
            .collect();
        Ok(EpochPage {
            path: path.to_owned(),
            file,
            instance,
            state: Mutex::new(Slots {
                by_name: HashMap::new(),
                slots,
                closed: false,
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This host instance's id (never 0).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The slot of `cache` (given one on first use, and its stamp written),
    /// or `None` when every slot is taken.
    pub fn slot(&self, cache: &Cache) -> Option<usize> {
        let mut state = self.state.lock();
        if let Some(&i) = state.by_name.get(cache.name()) {
            return Some(i);
        }
        let i = state.by_name.len();
        if i >= SLOTS || state.closed {
            return None;
        }
        state.by_name.insert(cache.name().to_owned(), i);
        let epoch = cache.epoch();
        state.slots[i].1 = epoch;
        let stamp = state.slots[i].0.wrapping_add(epoch.wrapping_mul(2));
        self.write_slot(i, stamp);
        Some(i)
    }

    /// The stamp of `cache` at `epoch` (0 when the cache has no slot).
    pub fn stamp(&self, cache: &Cache, epoch: u64) -> u64 {
        let state = self.state.lock();
        match state.by_name.get(cache.name()) {
            Some(&i) => state.slots[i].0.wrapping_add(epoch.wrapping_mul(2)),
            None => 0,
        }
    }

    /// The epoch that `stamp` stands for in `cache`'s slot, if it is one of
    /// this instance's stamps of that slot.
    pub fn epoch_of(&self, cache: &Cache, stamp: u64) -> Option<u64> {
        let state = self.state.lock();
        let &i = state.by_name.get(cache.name())?;
        let twice = stamp.wrapping_sub(state.slots[i].0);
        twice.is_multiple_of(2).then_some(twice / 2)
    }

    /// Writes `cache`'s current stamp after a reset. Two resets racing may
    /// call this in either order: the highest epoch wins.
    pub fn bump(&self, cache: &Cache) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        let Some(&i) = state.by_name.get(cache.name()) else {
            return;
        };
        let epoch = cache.epoch();
        if epoch < state.slots[i].1 {
            return;
        }
        state.slots[i].1 = epoch;
        let stamp = state.slots[i].0.wrapping_add(epoch.wrapping_mul(2));
        self.write_slot(i, stamp);
    }

    fn write_slot(&self, i: usize, stamp: u64) {
        // An aligned 8-byte write: a reader sees the old or the new stamp
        // (a torn read could only be a third value, never a valid old one,
        // so the reader asks the host). A failed write leaves the old stamp:
        // clients would keep serving their copies, so the host says so.
        let _ = self
            .file
            .write_all_at(&stamp.to_ne_bytes(), (HEADER_BYTES + 8 * i) as u64);
    }

    /// The host leaves: every slot and the instance id read 0 (clients that
    /// still map the file go back to the socket and find the host gone),
    /// then the file is removed.
    pub fn close(&self) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        state.closed = true;
        let zeros = vec![0u8; PAGE_BYTES - 16];
        let _ = self.file.write_all_at(&zeros, 16);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EpochPage {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Bounds, Cache};

    fn read_u64(path: &Path, offset: usize) -> u64 {
        let bytes = std::fs::read(path).unwrap();
        u64::from_ne_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn stamps_change_on_reset_and_read_zero_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.epochs");
        let page = EpochPage::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(&std::fs::read(&path).unwrap()[..8], MAGIC);
        assert_eq!(read_u64(&path, 16), page.instance());
        let cache = Cache::new("square", Bounds::default());
        let slot = page.slot(&cache).unwrap();
        assert_eq!(slot, 0);
        let before = read_u64(&path, HEADER_BYTES);
        assert_ne!(before, 0);
        assert_eq!(before, page.stamp(&cache, cache.epoch()));
        assert_eq!(page.epoch_of(&cache, before), Some(0));
        cache.reset();
        page.bump(&cache);
        let after = read_u64(&path, HEADER_BYTES);
        assert_ne!(after, before);
        assert_eq!(page.epoch_of(&cache, after), Some(1));
        page.close();
        assert!(!path.exists());
    }

    #[test]
    fn a_dead_hosts_page_is_taken_over_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.epochs");
        let first = EpochPage::create(&path).unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        std::mem::forget(first); // died without cleaning up
        let second = EpochPage::create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(read_u64(&path, 16), second.instance());
    }
}
