//! Durable caches (`--persist DIR`): the tier behind the in-memory LRU.
//!
//! The memory tier answers hits; the durable tier is read on a memory miss
//! and written on every store, before the call that computed the value
//! returns, so an acknowledged entry survives the death of the process.
//! [`Tier`] is the small interface a tier implements (a shared tier can sit
//! beside this one); [`SqliteTier`] is the embedded store: SQLite in WAL
//! mode with `synchronous=NORMAL` (see `docs/PERSISTENCE.md` for why, with
//! the measurements).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

/// One stored entry with what the trust rules check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value's bytes (a `#[memo]` value begins with its shape tag).
    pub value: Vec<u8>,
    /// The code identity that computed it (0: unknown).
    pub identity: u64,
    /// When it was stored, in milliseconds since the Unix epoch.
    pub born_ms: u64,
    /// Nanoseconds it took to compute (0: stored by a put).
    pub cost_ns: u64,
}

/// Why a tier could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierError(pub String);

impl std::fmt::Display for TierError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rusqlite::Error> for TierError {
    fn from(e: rusqlite::Error) -> TierError {
        TierError(e.to_string())
    }
}

/// A tier of entries behind the memory: durable, or shared.
pub trait Tier: Send + Sync {
    /// The entry of `cache` under `key`.
    fn get(&self, cache: &str, key: &[u8]) -> Result<Option<Record>, TierError>;
    /// Stores (or replaces) an entry; durable when it returns.
    fn put(&self, cache: &str, key: &[u8], record: &Record) -> Result<(), TierError>;
    /// Drops one entry.
    fn remove(&self, cache: &str, key: &[u8]) -> Result<(), TierError>;
    /// Drops every entry of `cache`; returns how many there were.
    fn reset(&self, cache: &str) -> Result<u64, TierError>;
    /// Every entry of `cache`, oldest first.
    fn iter(&self, cache: &str, f: &mut dyn FnMut(&[u8], Record)) -> Result<(), TierError>;
    /// The caches the tier knows, with the code identity each was last
    /// declared with (0: none).
    fn caches(&self) -> Result<Vec<(String, u64)>, TierError>;
    /// Records the code identity of `cache`.
    fn set_identity(&self, cache: &str, identity: u64) -> Result<(), TierError>;
    /// Entries and bytes (keys plus values) of `cache` in the tier.
    fn figures(&self, cache: &str) -> Result<(u64, u64), TierError>;
    /// The host is leaving and nothing writes any more: let go of what
    /// only a running host needs (the store's lock, its write-ahead log).
    fn close(&self) {}
    /// Stores `value` under `key` as [`Tier::put`] does, from its parts (a
    /// tier that copies the bytes anyway need not build a [`Record`]).
    fn put_value(
        &self,
        cache: &str,
        key: &[u8],
        value: &[u8],
        identity: u64,
        born_ms: u64,
        cost_ns: u64,
    ) -> Result<(), TierError> {
        self.put(
            cache,
            key,
            &Record {
                value: value.to_vec(),
                identity,
                born_ms,
                cost_ns,
            },
        )
    }
    /// The memory tier evicted `key` (to hold its bounds). A store with
    /// bounds of its own keeps the entry (the default); the crash journal,
    /// which mirrors the memory, forgets it.
    fn evicted(&self, _cache: &str, _key: &[u8]) {}
    /// Whether a memory miss should ask this tier ([`Tier::get`]). The crash
    /// journal is read once, at start, and says no.
    fn reads(&self) -> bool {
        true
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The store's file in DIR.
pub const FILE_NAME: &str = "caches.sqlite";
/// The lock file that keeps a second host off DIR.
pub const LOCK_NAME: &str = "keepwarm.lock";

/// Why `--persist DIR` could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Another host holds DIR.
    Locked {
        /// DIR.
        dir: PathBuf,
        /// The other host's PID, when its lock file says.
        pid: Option<u32>,
    },
    /// DIR cannot be created or written, or SQLite refused it.
    Io(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked { dir, pid } => write!(
                f,
                "{} is in use by another keepwarm host{}; stop it, or give this host another --persist DIR",
                dir.display(),
                pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
            ),
            OpenError::Io(m) => f.write_str(m),
        }
    }
}

/// The embedded store: one SQLite database in WAL mode in DIR, held by
/// one host at a time (an advisory lock on `DIR/keepwarm.lock`, which also
/// names the holder's PID).
pub struct SqliteTier {
    dir: PathBuf,
    conn: Mutex<Connection>,
    /// Bytes of keys plus values the store may hold; past it the oldest
    /// entries are dropped.
    max_bytes: u64,
    puts: AtomicU64,
    /// Keys plus values in the store: counted at the first check, then
    /// grown by each put (a replacement is counted twice until the next
    /// exact count, so the estimate errs high).
    payload: AtomicU64,
    /// Whether `payload` was counted yet.
    counted: AtomicBool,
    /// The caches known to have their row in `caches` (so that a restart
    /// learns them without scanning the entries).
    listed: Mutex<std::collections::HashSet<String>>,
    lock: Option<File>,
    /// The thread that folds the write-ahead log into the database, off
    /// the put path (a checkpoint fsyncs); stopped by `close`.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// What opening found (a damaged file moved aside), for the host to say.
    pub notes: Vec<String>,
}

/// Puts between two checks of the byte bound.
const CHECK_EVERY: u64 = 256;

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Io(format!("{what} {}: {e}", path.display()))
}

impl SqliteTier {
    /// Opens (or creates) the store in `dir`. `max_bytes`: the store's
    /// bound; `None` for the default, a quarter of the free space of the
    /// file system holding `dir` (at least 64 MiB). A file SQLite cannot
    /// read is moved aside (`caches.sqlite.damaged-UNIXTIME`, kept, never
    /// deleted) and an empty store takes its place; [`SqliteTier::notes`]
    /// says so.
    pub fn open(dir: &Path, max_bytes: Option<u64>) -> Result<SqliteTier, OpenError> {
        // Created private (0700): cached values may be anything the
        // plugin computed. An existing directory keeps its mode.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("cannot create", dir, e))?;
        }
        let lock = lock_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let mut notes = Vec::new();
        let conn = match open_db(&path) {
            Ok(c) => c,
            Err(e) => {
                let aside = dir.join(format!("{FILE_NAME}.damaged-{}", now_ms() / 1000));
                std::fs::rename(&path, &aside).map_err(|e| io("cannot move aside", &path, e))?;
                for suffix in ["-wal", "-shm"] {
                    let side = dir.join(format!("{FILE_NAME}{suffix}"));
                    if side.exists() {
                        let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
                    }
                }
                notes.push(format!(
                    "the cache store {} was damaged ({e}); moved it to {} (kept) and started with empty caches",
                    path.display(),
                    aside.display()
                ));
                open_db(&path).map_err(|e| io("cannot create the store", &path, e))?
            }
        };
        let max_bytes = max_bytes.unwrap_or_else(|| default_bound(dir));
        // Puts never checkpoint (an fsync of the log and the database, ms):
        // a thread of its own does, every second while there are writes.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| io("cannot configure", &path, e))?;
        let checkpointer = spawn_checkpointer(&path).map_err(|e| io("cannot open", &path, e))?;
        Ok(SqliteTier {
            checkpointer: Mutex::new(Some(checkpointer)),
            dir: dir.to_owned(),
            conn: Mutex::new(conn),
            max_bytes,
            puts: AtomicU64::new(0),
            payload: AtomicU64::new(0),
            counted: AtomicBool::new(false),
            listed: Mutex::new(std::collections::HashSet::new()),
            lock: Some(lock),
            notes,
        })
    }

    /// Stores many entries of `cache` in one transaction (an import, a
    /// benchmark's fixture); returns how many.
    pub fn put_batch(
        &self,
        cache: &str,
        entries: impl IntoIterator<Item = (Vec<u8>, Record)>,
    ) -> Result<u64, TierError> {
        let mut conn = self.conn.lock();
        self.list(&conn, cache)?;
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached(INSERT)?;
            for (key, r) in entries {
                insert(&mut stmt, cache, &key, &r)?;
                n += 1;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Gives `cache` its row in `caches` (identity 0 until declared), once
    /// per process.
    fn list(&self, conn: &Connection, cache: &str) -> Result<(), TierError> {
        let mut listed = self.listed.lock();
        if !listed.contains(cache) {
            conn.prepare_cached("INSERT OR IGNORE INTO caches (name, identity) VALUES (?1, 0)")?
                .execute(params![cache])?;
            listed.insert(cache.to_owned());
        }
        Ok(())
    }

    /// DIR.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's byte bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Keys plus values in the store, and entries, counted (a scan).
    fn count(conn: &Connection) -> Result<(u64, u64), TierError> {
        Ok(conn.query_row(
            "SELECT coalesce(sum(length(key) + length(value)), 0), count(*) FROM entries",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Past the bound (by the estimate, then by an exact count), drops the
    /// entries stored longest ago, a twentieth of them at a time, until the
    /// store holds at most 90 % of its bound.
    fn enforce_bound(&self, conn: &Connection) -> Result<(), TierError> {
        if !self.counted.load(Ordering::Relaxed) {
            let (bytes, _) = Self::count(conn)?;
            self.payload.store(bytes, Ordering::Relaxed);
            self.counted.store(true, Ordering::Relaxed);
        }
        if self.payload.load(Ordering::Relaxed) <= self.max_bytes {
            return Ok(());
        }
        let target = self.max_bytes / 10 * 9;
        let (mut bytes, mut rows) = Self::count(conn)?;
        while bytes > target && rows > 0 {
            let batch = (rows / 20).max(64) as i64;
            conn.prepare_cached(
                "DELETE FROM entries WHERE (cache, key) IN
                 (SELECT cache, key FROM entries ORDER BY born LIMIT ?1)",
            )?
            .execute(params![batch])?;
            (bytes, rows) = Self::count(conn)?;
        }
        self.payload.store(bytes, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SqliteTier {
    fn drop(&mut self) {
        self.close();
    }
}

/// How long opening DIR waits for another host to let go of it.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the advisory lock on `dir`, writing this process's PID in it.
fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_NAME);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("cannot open", &path, e))?;
    use std::os::fd::AsRawFd;
    // A host that is shutting down (the worker of a supervisor that was
    // killed stops cleanly a moment later) lets go of DIR within moments:
    // wait for it a little before refusing.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let locked = loop {
        // SAFETY: flock on a descriptor this function owns; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break true;
        }
        if std::time::Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if !locked {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(OpenError::Locked {
            dir: dir.to_owned(),
            pid: text.trim().parse().ok(),
        });
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// How often the checkpointer folds the log into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts the thread that checkpoints the store at `path` (its own
/// connection: a passive checkpoint runs beside the writer, never blocking
/// it); it stops when the sender is dropped or sends.
fn spawn_checkpointer(
    path: &Path,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.busy_timeout(std::time::Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("keepwarm-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
        .map_err(|e| e.to_string())?;
    Ok((stop, thread))
}

/// A quarter of the free space under `dir`, at least 64 MiB.
fn default_bound(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 1 << 30;
    };
    // SAFETY: statvfs writes into the zeroed struct it is given; `c` is a
    // valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 1 << 30;
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    (free / 4).max(64 << 20)
}

/// Opens the database, checks that it is one, and makes the schema.
fn open_db(path: &Path) -> Result<Connection, rusqlite::Error> {
    check_length(path)?;
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL with synchronous=NORMAL: a commit is in the WAL file (the
    // kernel's page cache) when it returns, so it survives the death of the
    // process; power loss may lose the last commits, never the file.
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))?;
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS entries (
             cache TEXT NOT NULL,
             key BLOB NOT NULL,
             value BLOB NOT NULL,
             identity INTEGER NOT NULL,
             born INTEGER NOT NULL,
             cost INTEGER NOT NULL,
             PRIMARY KEY (cache, key)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS caches (
             name TEXT PRIMARY KEY,
             identity INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    // Read a row: a file damaged past its header fails here, not later.
    conn.query_row("SELECT count(*) FROM caches", [], |r| r.get::<_, i64>(0))?;
    conn.query_row(
        "SELECT count(*) FROM (SELECT born FROM entries LIMIT 1)",
        [],
        |r| r.get::<_, i64>(0),
    )?;
    Ok(conn)
}

/// A store file shorter than its own header says is truncated: found at
/// open from the first 100 bytes, without reading the rest (a scan of a
/// million entries would cost the restart a second).
fn check_length(path: &Path) -> Result<(), rusqlite::Error> {
    let Ok(mut file) = File::open(path) else {
        return Ok(());
    };
    let mut header = [0u8; 100];
    let len = file.metadata().map_or(0, |m| m.len());
    if len < 100 || file.read_exact(&mut header).is_err() || &header[..16] != b"SQLite format 3\0" {
        // Empty (new), or not SQLite at all: SQLite itself says which.
        return Ok(());
    }
    let page = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    if len < pages * page {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!(
                "truncated: the file has {len} bytes, its header says {}",
                pages * page
            )),
        ));
    }
    Ok(())
}

/// Stores or replaces one entry (with [`insert`]).
const INSERT: &str = "INSERT OR REPLACE INTO entries (cache, key, value, identity, born, cost)
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Runs [`INSERT`] for one entry (the u64 fields stored as SQLite's i64,
/// bit for bit).
fn insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    cache: &str,
    key: &[u8],
    r: &Record,
) -> rusqlite::Result<usize> {
    stmt.execute(params![
        cache,
        key,
        r.value,
        r.identity as i64,
        r.born_ms as i64,
        r.cost_ns as i64
    ])
}

fn record(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Record> {
    Ok(Record {
        value: row.get(first)?,
        identity: row.get::<_, i64>(first + 1)? as u64,
        born_ms: row.get::<_, i64>(first + 2)? as u64,
        cost_ns: row.get::<_, i64>(first + 3)? as u64,
    })
}

impl Tier for SqliteTier {
    fn get(&self, cache: &str, key: &[u8]) -> Result<Option<Record>, TierError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT value, identity, born, cost FROM entries WHERE cache = ?1 AND key = ?2",
        )?;
        Ok(stmt
            .query_row(params![cache, key], |row| record(row, 0))
            .optional()?)
    }

    fn put(&self, cache: &str, key: &[u8], r: &Record) -> Result<(), TierError> {
        let conn = self.conn.lock();
        self.list(&conn, cache)?;
        // A replaced entry gets the time of its replacement: the bound
        // drops the entries written longest ago.
        insert(&mut conn.prepare_cached(INSERT)?, cache, key, r)?;
        self.payload
            .fetch_add((key.len() + r.value.len()) as u64, Ordering::Relaxed);
        let n = self.puts.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(CHECK_EVERY) {
            self.enforce_bound(&conn)?;
        }
        Ok(())
    }

    fn remove(&self, cache: &str, key: &[u8]) -> Result<(), TierError> {
        self.conn
            .lock()
            .prepare_cached("DELETE FROM entries WHERE cache = ?1 AND key = ?2")?
            .execute(params![cache, key])?;
        Ok(())
    }

    fn reset(&self, cache: &str) -> Result<u64, TierError> {
        let n = self
            .conn
            .lock()
            .prepare_cached("DELETE FROM entries WHERE cache = ?1")?
            .execute(params![cache])?;
        Ok(n as u64)
    }

    fn iter(&self, cache: &str, f: &mut dyn FnMut(&[u8], Record)) -> Result<(), TierError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT key, value, identity, born, cost FROM entries WHERE cache = ?1 ORDER BY born",
        )?;
        let mut rows = stmt.query(params![cache])?;
        while let Some(row) = rows.next()? {
            let key: Vec<u8> = row.get(0)?;
            f(&key, record(row, 1)?);
        }
        Ok(())
    }

    fn caches(&self) -> Result<Vec<(String, u64)>, TierError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached("SELECT name, identity FROM caches ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_identity(&self, cache: &str, identity: u64) -> Result<(), TierError> {
        self.conn
            .lock()
            .prepare_cached("INSERT OR REPLACE INTO caches (name, identity) VALUES (?1, ?2)")?
            .execute(params![cache, identity as i64])?;
        Ok(())
    }

    fn close(&self) {
        // Fold the write-ahead log into the database (the -wal file is
        // emptied), then drop the lock file; the lock itself goes with the
        // process. The store stays: it is what the next start reads.
        if let Some((stop, thread)) = self.checkpointer.lock().take() {
            drop(stop);
            let _ = thread.join();
        }
        let conn = self.conn.lock();
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        if self.lock.is_some() {
            let _ = std::fs::remove_file(self.dir.join(LOCK_NAME));
        }
    }

    fn figures(&self, cache: &str) -> Result<(u64, u64), TierError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT count(*), coalesce(sum(length(key) + length(value)), 0) FROM entries WHERE cache = ?1",
        )?;
        Ok(stmt.query_row(params![cache], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &[u8]) -> Record {
        Record {
            value: v.to_vec(),
            identity: 7,
            born_ms: now_ms(),
            cost_ns: 5,
        }
    }

    #[test]
    fn entries_survive_reopening_and_resets_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = SqliteTier::open(dir.path(), None).unwrap();
            t.put("square", b"k1", &rec(b"v1")).unwrap();
            t.put("square", b"k2", &rec(b"v2")).unwrap();
            t.put("other", b"k", &rec(b"o")).unwrap();
            t.set_identity("square", 7).unwrap();
            assert_eq!(t.reset("other").unwrap(), 1);
            t.remove("square", b"k2").unwrap();
        }
        let t = SqliteTier::open(dir.path(), None).unwrap();
        assert_eq!(
            t.get("square", b"k1").unwrap(),
            Some(rec(b"v1")).map(|mut r| {
                r.born_ms = t.get("square", b"k1").unwrap().unwrap().born_ms;
                r
            })
        );
        assert_eq!(t.get("square", b"k2").unwrap(), None);
        assert_eq!(t.get("other", b"k").unwrap(), None);
        // A reset cache is still a cache; its identity is kept.
        assert_eq!(
            t.caches().unwrap(),
            [("other".to_owned(), 0), ("square".to_owned(), 7)]
        );
        assert_eq!(t.figures("square").unwrap(), (1, 4));
        let mut seen = Vec::new();
        t.iter("square", &mut |k, r| seen.push((k.to_vec(), r.value)))
            .unwrap();
        assert_eq!(seen, [(b"k1".to_vec(), b"v1".to_vec())]);
    }

    #[test]
    fn a_second_opener_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SqliteTier::open(dir.path(), None).unwrap();
        match SqliteTier::open(dir.path(), None) {
            Err(OpenError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_damaged_file_is_moved_aside_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).unwrap();
        let t = SqliteTier::open(dir.path(), None).unwrap();
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
        assert!(t.notes[0].contains("damaged"), "{:?}", t.notes);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), vec![0x5a; 8192]);
        t.put("c", b"k", &rec(b"v")).unwrap();
    }

    #[test]
    fn the_bound_drops_the_oldest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let t = SqliteTier::open(dir.path(), Some(256 << 10)).unwrap();
        for i in 0..2_000u32 {
            t.put("c", &i.to_le_bytes(), &rec(&[1u8; 512])).unwrap();
        }
        let (n, _) = t.figures("c").unwrap();
        assert!(n < 2_000 && n > 100, "{n}");
        assert!(t.get("c", &1999u32.to_le_bytes()).unwrap().is_some());
        assert!(t.get("c", &0u32.to_le_bytes()).unwrap().is_none());
    }
}
