//! The crash journal: an append-only record of every cache change, kept in
//! memory that outlives the process writing it.
//!
//! Without `--persist`, the caches of `keepwarm run` live in the worker's
//! memory, and a plugin that segfaults takes the worker with it. The
//! supervisor therefore creates a memfd (anonymous shared memory) and hands
//! it to each worker it starts; the worker appends every put, removal,
//! eviction, reset and identity change to it *before the call that made it
//! answers*, at memory speed (a copy and a CRC under one lock, no system
//! call). When a worker dies, the memory stays with the supervisor; the next
//! worker replays the journal and starts with every acknowledged entry.
//!
//! Why not the SQLite store of `--persist`: a cold memoized call that puts
//! through the store costs about 26 times one in memory only (a transaction
//! per put), through the journal about 1.6 times (0.4 µs more, compactions
//! included; `BENCHMARKS.md`, "Crash containment", rows `crash_protection/…`
//! of `make bench`). The journal
//! guards against the death of the process only, which is what a crashing
//! plugin causes; `--persist` is still the answer to a reboot.
//!
//! Layout of the memfd: a header page, then two regions of [`REGION`] bytes
//! (sparse: only the bytes written take memory). One region is active;
//! records are appended to it, and `committed[active]` is advanced after
//! each complete record, so a record cut short by the death of the writer is
//! never read. When the active region has grown to twice what the last
//! compaction left (64 MiB at least), the live records — the latest put of
//! each key not removed or reset since — are copied to the other region, the
//! header flips to it in one store, and the old region's memory is released.
//! Every record carries a CRC32: bytes a wild plugin write damaged are found
//! and the replay stops there, dropping what follows rather than serving it.
//!
//! ```
//! use keepwarm::journal::{Journal, Replayed};
//!
//! let journal = Journal::create().unwrap();
//! journal.put("square", b"10", b"100", 7, 0, 0);
//! journal.put("square", b"11", b"121", 7, 0, 0);
//! journal.reset("square");
//! journal.put("square", b"12", b"144", 7, 0, 0);
//! // What a new worker finds (here: the same process, another mapping).
//! let again = Journal::from_fd(journal.try_clone_fd().unwrap()).unwrap();
//! let Replayed { entries, .. } = again.take_replayed();
//! assert_eq!(entries.len(), 1);
//! assert_eq!(entries[0].1, b"12");
//! ```

use std::collections::HashMap;

type FoldMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::persist::{Record, Tier, TierError};

/// Bytes of each of the two regions (virtual: the memfd is sparse, and only
/// what is written takes memory).
pub const REGION: u64 = 16 << 30;
/// The header page.
const HEADER: u64 = 4096;
/// The active region is compacted when it holds this many bytes, or twice
/// what the last compaction left, whichever is more.
pub const COMPACT_AT_LEAST: u64 = 64 << 20;

const MAGIC: u64 = 0x6b77_6a6f_7572_6e31; // "kwjourn1"

/// Fixed part of a record: len u32, crc u32, kind u8, 0 u8, name_len u16,
/// key_len u32, identity u64, born_ms u64, cost_ns u64.
const FIXED: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Put = 1,
    Remove = 2,
    Reset = 3,
    Identity = 4,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    /// The active region (0 or 1).
    active: AtomicU64,
    /// Bytes of complete records in each region.
    committed: [AtomicU64; 2],
    /// Compactions so far.
    compactions: AtomicU64,
}

/// What a new worker found in the journal: the caches with their code
/// identity, and the live entries in the order they were stored.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Caches named in the journal, with the identity last recorded (0: none).
    pub caches: Vec<(String, u64)>,
    /// (cache, key, record), oldest first.
    pub entries: Vec<(String, Vec<u8>, Record)>,
    /// What the replay noticed (damage found, records dropped).
    pub notes: Vec<String>,
}

struct Writer {
    /// Where the next record goes in the active region.
    offset: u64,
    /// Compact when `offset` would pass this.
    compact_at: u64,
    /// Records not written because the region was full.
    dropped: u64,
}

/// Says a problem of the journal (the host's warning line).
type Warn = Box<dyn Fn(&str) + Send + Sync>;

/// The crash journal (see the module docs).
pub struct Journal {
    fd: OwnedFd,
    base: *mut u8,
    writer: Mutex<Writer>,
    replayed: Mutex<Option<Replayed>>,
    /// Says the first record dropped for want of room.
    warn: Mutex<Option<Warn>>,
}

// SAFETY: `base` points at a shared mapping that lives as long as the
// journal; every write to it happens under `writer`, and the header fields
// are atomics.
unsafe impl Send for Journal {}
// SAFETY: as above.
unsafe impl Sync for Journal {}

fn map_len() -> usize {
    (HEADER + 2 * REGION) as usize
}

fn align8(n: u64) -> u64 {
    n.next_multiple_of(8)
}

impl Journal {
    /// A new, empty journal (the supervisor's), in a memfd that is closed on
    /// exec (hand it to a worker with [`Journal::inheritable`]).
    pub fn create() -> std::io::Result<Journal> {
        let fd = crate::supervision::memfd(c"keepwarm-journal", map_len() as u64)?;
        let journal = Journal::map(fd)?;
        journal.header().magic.store(MAGIC, Ordering::Release);
        Ok(journal)
    }

    /// The journal in descriptor `fd` (a worker's, inherited from its
    /// supervisor), replayed: its live entries wait in
    /// [`Journal::take_replayed`], and the journal is compacted to them.
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Journal> {
        let journal = Journal::map(fd)?;
        if journal.header().magic.load(Ordering::Acquire) != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the descriptor is not a keepwarm crash journal",
            ));
        }
        let replayed = {
            let mut writer = journal.writer.lock();
            journal.compact(&mut writer)
        };
        *journal.replayed.lock() = Some(replayed);
        Ok(journal)
    }

    fn map(fd: OwnedFd) -> std::io::Result<Journal> {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `stat` for an open descriptor.
        if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstat returned 0, so `stat` is initialized.
        let size = unsafe { stat.assume_init() }.st_size as u64;
        if size < map_len() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the crash journal is smaller than its layout",
            ));
        }
        // SAFETY: a shared mapping of the first map_len() bytes of a file at
        // least that long; the kernel picks the address. MAP_NORESERVE: the
        // file is sparse, only written pages take memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // A process the plugin forks must not write our records.
        // SAFETY: advice on the mapping just made, of its exact length.
        unsafe { libc::madvise(ptr, map_len(), libc::MADV_DONTFORK) };
        Ok(Journal {
            fd,
            base: ptr.cast(),
            writer: Mutex::new(Writer {
                offset: 0,
                compact_at: COMPACT_AT_LEAST,
                dropped: 0,
            }),
            replayed: Mutex::new(None),
            warn: Mutex::new(None),
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a page of which Header takes the
        // first bytes; every field is an atomic, for which the zero bytes
        // of a new memfd are a valid value; the mapping outlives `self`.
        unsafe { &*(self.base as *const Header) }
    }

    /// Region `i` as bytes.
    fn region(&self, i: usize) -> &[u8] {
        // SAFETY: region i lies inside the mapping (HEADER + 2 * REGION
        // bytes). Other processes write it only while this one is not
        // running (a worker and its successor never overlap), and this
        // process writes it only under `writer`, which every reader of a
        // region holds.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add((HEADER + i as u64 * REGION) as usize),
                REGION as usize,
            )
        }
    }

    /// Copies `parts` to region `i` at `offset`.
    ///
    /// # Safety
    ///
    /// The caller holds `writer`, and `offset + total length of parts` is
    /// at most [`REGION`].
    unsafe fn write(&self, i: usize, offset: u64, parts: &[&[u8]]) {
        let mut at = (HEADER + i as u64 * REGION + offset) as usize;
        for part in parts {
            // SAFETY: inside region i (the caller's bound); `part` is the
            // caller's memory, never the mapping's range being written.
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), self.base.add(at), part.len());
            }
            at += part.len();
        }
    }

    /// A duplicate of the descriptor (close-on-exec).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// The descriptor, to hand to a worker.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Lets a process started from this one inherit the descriptor.
    pub fn inheritable(&self) -> std::io::Result<()> {
        crate::supervision::make_inheritable(self.fd.as_raw_fd())
    }

    /// What the replay at [`Journal::from_fd`] found (once; empty after).
    pub fn take_replayed(&self) -> Replayed {
        self.replayed.lock().take().unwrap_or_default()
    }

    /// Says, through `warn`, the first record dropped because the journal
    /// is full.
    pub fn on_warning(&self, warn: impl Fn(&str) + Send + Sync + 'static) {
        *self.warn.lock() = Some(Box::new(warn));
    }

    /// Bytes of records in the active region.
    pub fn len(&self) -> u64 {
        self.writer.lock().offset
    }

    /// True when the active region holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records dropped because the journal was full.
    pub fn dropped(&self) -> u64 {
        self.writer.lock().dropped
    }

    /// Compactions so far (kept across workers).
    pub fn compactions(&self) -> u64 {
        self.header().compactions.load(Ordering::Acquire)
    }

    /// Appends a put of `value` under `key` in `cache`.
    pub fn put(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        identity: u64,
        born_ms: u64,
        cost_ns: u64,
    ) {
        self.append(Kind::Put, cache, key, value, [identity, born_ms, cost_ns]);
    }

    /// Appends the removal of `key` from `cache` (evicted, or dropped).
    pub fn remove(&self, cache: &str, key: &[u8]) {
        self.append(Kind::Remove, cache, key, &[], [0; 3]);
    }

    /// Appends a reset of `cache`.
    pub fn reset(&self, cache: &str) {
        self.append(Kind::Reset, cache, &[], &[], [0; 3]);
    }

    /// Appends the code identity of `cache`.
    pub fn identity(&self, cache: &str, identity: u64) {
        self.append(Kind::Identity, cache, &[], &[], [identity, 0, 0]);
    }

    fn append(&self, kind: Kind, cache: &str, key: &[u8], value: &[u8], numbers: [u64; 3]) {
        let Ok(name_len) = u16::try_from(cache.len()) else {
            return self.drop_record("a cache name longer than 65535 bytes");
        };
        let Ok(key_len) = u32::try_from(key.len()) else {
            return self.drop_record("a key of 4 GiB or more");
        };
        let len = FIXED + cache.len() + key.len() + value.len();
        let Ok(len32) = u32::try_from(len) else {
            return self.drop_record("an entry of 4 GiB or more");
        };
        let mut fixed = [0u8; FIXED];
        fixed[0..4].copy_from_slice(&len32.to_le_bytes());
        fixed[8] = kind as u8;
        fixed[10..12].copy_from_slice(&name_len.to_le_bytes());
        fixed[12..16].copy_from_slice(&key_len.to_le_bytes());
        for (i, n) in numbers.iter().enumerate() {
            fixed[16 + 8 * i..24 + 8 * i].copy_from_slice(&n.to_le_bytes());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&fixed[8..]);
        crc.update(cache.as_bytes());
        crc.update(key);
        crc.update(value);
        fixed[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        let size = align8(len as u64);

        let mut writer = self.writer.lock();
        if writer.offset + size > writer.compact_at {
            let _ = self.compact(&mut writer);
        }
        if writer.offset + size > REGION {
            writer.dropped += 1;
            let first = writer.dropped == 1;
            drop(writer);
            if first {
                self.drop_record("the crash journal is full");
            }
            return;
        }
        let active = self.header().active.load(Ordering::Acquire) as usize & 1;
        // SAFETY: `writer` is held and offset + size <= REGION.
        unsafe {
            self.write(
                active,
                writer.offset,
                &[&fixed, cache.as_bytes(), key, value],
            )
        };
        writer.offset += size;
        // The record is complete: a reader after the death of this process
        // sees it, and never a part of it.
        self.header().committed[active].store(writer.offset, Ordering::Release);
    }

    fn drop_record(&self, why: &str) {
        if let Some(warn) = &*self.warn.lock() {
            warn(&format!(
                "{why}: this entry is kept in memory but would not survive a crash of the plugin"
            ));
        }
    }

    /// Reads the active region, copies its live records to the other one,
    /// flips to it, and releases the old region's memory. Returns what was
    /// live. The caller holds `writer` (passed in).
    fn compact(&self, writer: &mut Writer) -> Replayed {
        let header = self.header();
        let active = header.active.load(Ordering::Acquire) as usize & 1;
        let committed = header.committed[active].load(Ordering::Acquire).min(REGION);
        let region = self.region(active);
        let mut notes = Vec::new();
        // Cache index by name, identities, and per cache the offset of the
        // live put of each key.
        // foldhash, not SipHash: the keys are our own records, and hashing
        // every live key is most of a compaction's cost.
        let mut names: Vec<&str> = Vec::new();
        let mut index: FoldMap<&str, usize> = FoldMap::default();
        let mut identities: Vec<(u64, Option<usize>)> = Vec::new();
        let mut live: Vec<FoldMap<&[u8], usize>> = Vec::new();
        let mut at = 0usize;
        while (at as u64) < committed {
            let Some(r) = parse(&region[at..committed as usize]) else {
                notes.push(format!(
                    "the crash journal was damaged at byte {at} of {committed}: the entries recorded after it are dropped, not served"
                ));
                break;
            };
            let i = *index.entry(r.cache).or_insert_with(|| {
                names.push(r.cache);
                identities.push((0, None));
                live.push(FoldMap::default());
                names.len() - 1
            });
            match r.kind {
                Kind::Put => {
                    live[i].insert(r.key, at);
                }
                Kind::Remove => {
                    live[i].remove(r.key);
                }
                Kind::Reset => live[i].clear(),
                Kind::Identity => identities[i] = (r.numbers[0], Some(at)),
            }
            at += align8(r.len as u64) as usize;
        }
        // The records to keep, in the order they were written: identities
        // first, so that a replay knows each cache's before its entries.
        let mut keep: Vec<usize> = identities.iter().filter_map(|(_, at)| *at).collect();
        let mut puts: Vec<usize> = live.iter().flat_map(|m| m.values().copied()).collect();
        puts.sort_unstable();
        keep.extend_from_slice(&puts);
        let other = 1 - active;
        let mut offset = 0u64;
        let mut entries = Vec::with_capacity(puts.len());
        for &at in &keep {
            let r = parse(&region[at..]).expect("parsed above");
            let size = align8(r.len as u64);
            // SAFETY: `writer` is held by our caller; the kept records
            // came from a region of REGION bytes, so they fit in another.
            unsafe { self.write(other, offset, &[&region[at..at + r.len as usize]]) };
            offset += size;
            if r.kind == Kind::Put {
                entries.push((
                    r.cache.to_owned(),
                    r.key.to_vec(),
                    Record {
                        value: r.value.to_vec(),
                        identity: r.numbers[0],
                        born_ms: r.numbers[1],
                        cost_ns: r.numbers[2],
                    },
                ));
            }
        }
        // Owned copies before the old region is released (the names borrow it).
        let caches = names
            .iter()
            .zip(&identities)
            .map(|(n, (id, _))| ((*n).to_owned(), *id))
            .collect();
        header.committed[other].store(offset, Ordering::Release);
        // The flip: one store; a death before it leaves the old region
        // active and whole.
        header.active.store(other as u64, Ordering::Release);
        header.committed[active].store(0, Ordering::Release);
        header.compactions.fetch_add(1, Ordering::AcqRel);
        // Give the old region's memory back.
        // SAFETY: fallocate on our own memfd, within its size; punching a
        // hole keeps the size and makes the range read as zero.
        unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (HEADER + active as u64 * REGION) as libc::off_t,
                committed.max(1) as libc::off_t,
            )
        };
        writer.offset = offset;
        writer.compact_at = (2 * offset).clamp(COMPACT_AT_LEAST, REGION);
        Replayed {
            caches,
            entries,
            notes,
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing borrows
        // it past `self`.
        unsafe { libc::munmap(self.base.cast(), map_len()) };
    }
}

/// One record, borrowed from a region.
struct Parsed<'a> {
    len: u32,
    kind: Kind,
    cache: &'a str,
    key: &'a [u8],
    value: &'a [u8],
    numbers: [u64; 3],
}

/// The record at the start of `bytes`, if it is whole and its CRC holds.
fn parse(bytes: &[u8]) -> Option<Parsed<'_>> {
    let fixed = bytes.get(..FIXED)?;
    let u32_at = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(fixed[i..i + 8].try_into().unwrap());
    let len = u32_at(0);
    let body = bytes.get(..len as usize)?;
    let name_len = u16::from_le_bytes([fixed[10], fixed[11]]) as usize;
    let key_len = u32_at(12) as usize;
    if (len as usize) < FIXED + name_len + key_len {
        return None;
    }
    if crc32fast::hash(&body[8..]) != u32_at(4) {
        return None;
    }
    let kind = match fixed[8] {
        1 => Kind::Put,
        2 => Kind::Remove,
        3 => Kind::Reset,
        4 => Kind::Identity,
        _ => return None,
    };
    let cache = std::str::from_utf8(&body[FIXED..FIXED + name_len]).ok()?;
    let key = &body[FIXED + name_len..FIXED + name_len + key_len];
    let value = &body[FIXED + name_len + key_len..];
    Some(Parsed {
        len,
        kind,
        cache,
        key,
        value,
        numbers: [u64_at(16), u64_at(24), u64_at(32)],
    })
}

/// The journal as the tier behind the memory caches: it records, and is
/// read once, at start (a worker's memory holds everything it has).
pub struct JournalTier(pub std::sync::Arc<Journal>);

impl Tier for JournalTier {
    fn get(&self, _: &str, _: &[u8]) -> Result<Option<Record>, TierError> {
        Ok(None)
    }

    fn put(&self, cache: &str, key: &[u8], r: &Record) -> Result<(), TierError> {
        self.put_value(cache, key, &r.value, r.identity, r.born_ms, r.cost_ns)
    }

    fn put_value(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        identity: u64,
        born_ms: u64,
        cost_ns: u64,
    ) -> Result<(), TierError> {
        self.0.put(cache, key, value, identity, born_ms, cost_ns);
        Ok(())
    }

    fn remove(&self, cache: &str, key: &[u8]) -> Result<(), TierError> {
        self.0.remove(cache, key);
        Ok(())
    }

    fn evicted(&self, cache: &str, key: &[u8]) {
        self.0.remove(cache, key);
    }

    fn reset(&self, cache: &str) -> Result<u64, TierError> {
        self.0.reset(cache);
        Ok(0)
    }

    fn iter(&self, _: &str, _: &mut dyn FnMut(&[u8], Record)) -> Result<(), TierError> {
        Ok(())
    }

    fn caches(&self) -> Result<Vec<(String, u64)>, TierError> {
        Ok(Vec::new())
    }

    fn set_identity(&self, cache: &str, identity: u64) -> Result<(), TierError> {
        self.0.identity(cache, identity);
        Ok(())
    }

    fn figures(&self, _: &str) -> Result<(u64, u64), TierError> {
        Ok((0, 0))
    }

    fn reads(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn reopen(j: &Journal) -> (Journal, Replayed) {
        let again = Journal::from_fd(j.try_clone_fd().unwrap()).unwrap();
        let r = again.take_replayed();
        (again, r)
    }

    fn keys(r: &Replayed) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        r.entries
            .iter()
            .map(|(c, k, rec)| (c.clone(), k.clone(), rec.value.clone()))
            .collect()
    }

    #[test]
    fn puts_removes_resets_and_identities_replay_in_order() {
        let j = Journal::create().unwrap();
        j.identity("a", 5);
        j.put("a", b"1", b"one", 5, 10, 20);
        j.put("b", b"1", b"uno", 0, 0, 0);
        j.put("a", b"2", b"two", 5, 0, 0);
        j.put("a", b"1", b"ONE", 5, 0, 0);
        j.remove("a", b"2");
        j.reset("b");
        j.put("b", b"3", b"tres", 0, 0, 0);
        j.identity("a", 6);
        let (_again, r) = reopen(&j);
        assert_eq!(
            keys(&r),
            vec![
                ("a".into(), b"1".to_vec(), b"ONE".to_vec()),
                ("b".into(), b"3".to_vec(), b"tres".to_vec()),
            ]
        );
        assert_eq!(r.caches, vec![("a".into(), 6), ("b".into(), 0)]);
        assert!(r.notes.is_empty());
    }

    #[test]
    fn a_replayed_journal_is_compact_and_replays_the_same_again() {
        let j = Journal::create().unwrap();
        for round in 0..10u8 {
            for k in 0..100u8 {
                j.put("c", &[k], &[round; 100], 1, 2, 3);
            }
        }
        let before = j.len();
        let (again, r) = reopen(&j);
        assert_eq!(r.entries.len(), 100);
        assert!(again.len() < before / 5, "{} vs {before}", again.len());
        drop(j);
        let (_third, r2) = reopen(&again);
        assert_eq!(keys(&r2), keys(&r));
        assert_eq!(r2.entries[0].2.born_ms, 2);
        assert_eq!(r2.entries[0].2.cost_ns, 3);
    }

    #[test]
    fn a_damaged_record_stops_the_replay_and_nothing_after_it_is_served() {
        let j = Journal::create().unwrap();
        j.put("c", b"k1", b"v1", 0, 0, 0);
        let second = j.len();
        j.put("c", b"k2", b"v2", 0, 0, 0);
        j.put("c", b"k3", b"v3", 0, 0, 0);
        // A wild write flips one byte of the second record's value.
        let active = j.header().active.load(Ordering::Acquire) as usize;
        let at = (HEADER + active as u64 * REGION + second) as usize + FIXED + 3;
        // SAFETY: inside the mapping, in a committed record.
        unsafe { *j.base.add(at) ^= 0xff };
        let (_again, r) = reopen(&j);
        assert_eq!(keys(&r), vec![("c".into(), b"k1".to_vec(), b"v1".to_vec())]);
        assert!(r.notes[0].contains("damaged"), "{:?}", r.notes);
    }

    #[test]
    fn a_record_cut_short_by_a_death_is_never_read() {
        let j = Journal::create().unwrap();
        j.put("c", b"k1", b"v1", 0, 0, 0);
        // Bytes written past `committed` (a writer that died mid-record).
        let active = j.header().active.load(Ordering::Acquire) as usize;
        let at = (HEADER + active as u64 * REGION + j.len()) as usize;
        // SAFETY: inside the mapping, past the committed records.
        unsafe { std::ptr::write_bytes(j.base.add(at), 0x55, 64) };
        let (_again, r) = reopen(&j);
        assert_eq!(r.entries.len(), 1);
        assert!(r.notes.is_empty());
    }

    #[test]
    fn growth_compacts_and_keeps_only_live_records() {
        let j = Journal::create().unwrap();
        let value = vec![7u8; 4096];
        // 100 MiB of puts over 1,000 keys: compaction keeps ~4 MiB.
        for i in 0..25_600u32 {
            j.put("big", &(i % 1000).to_le_bytes(), &value, 0, 0, 0);
        }
        assert!(j.compactions() >= 1);
        assert!(j.len() < COMPACT_AT_LEAST, "{}", j.len());
        let (_again, r) = reopen(&j);
        assert_eq!(r.entries.len(), 1000);
    }

    #[test]
    fn not_a_journal_is_refused() {
        let other = crate::supervision::BlackBox::create().unwrap();
        // SAFETY: dup of a descriptor we hold gives one we own.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::dup(other.raw_fd())) };
        assert!(Journal::from_fd(fd).is_err());
    }
}
