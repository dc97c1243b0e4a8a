//! The shared tier (`--shared redis://HOST:PORT[/DB]`): entries computed by
//! the same code, shared by every host that points at one Redis (or Valkey)
//! server — a team's machines, CI, a notebook server.
//!
//! It sits behind the memory and the local store and is never in the way:
//!
//! - **Read-through.** A local miss asks the server before computing, for at
//!   most [`SharedConfig::timeout`] (50 ms by default); a local hit never
//!   touches the network.
//! - **Write-behind.** A computed entry is queued and written by a
//!   background task; the call does not wait. The queue is bounded
//!   ([`QUEUE_ENTRIES`], [`QUEUE_BYTES`]); what does not fit is dropped and
//!   counted.
//! - **Outages.** A request that fails to reach the server or times out
//!   opens a breaker: no call asks the server, and no write is sent, until
//!   a background ping reaches it again (tried after 250 ms, then at
//!   intervals doubling to 5 s). One warning per outage, one line when it
//!   is back. An error the server answers about one key (a wrong type) is
//!   counted, not an outage.
//!
//! **Identity.** An entry is shared only under the full identity of the code
//! that computed it. Its Redis key is
//!
//! ```text
//! {prefix}:v1:{plugin}:{cache}:{code:016x}:{shape:016x}:{key bytes}
//! ```
//!
//! where `code` is the memoized function's body hash (with its `version`
//! and module path) and `shape` the value's shape tag. A build whose
//! function body changed has another `code`: it never reads, and never
//! overwrites, the entries of the old one. A cache that carries no code
//! identity (a C plugin's cache declared without a code hash, a protocol
//! client that opened the cache without `code`) is never shared.
//!
//! **Values are checked before use.** Each value carries a 48-byte
//! [header](encode): magic `KWSH`, format 1, the xxh3 hash of its full Redis
//! key (so a value copied under another key is refused), when it was
//! computed and what it cost, its length, and an xxh3 checksum of header and
//! bytes. A value that fails any check, an empty one, or one longer than
//! [`MAX_VALUE`] (refused from its length, without being read) is refused and
//! counted, never served. The checks catch damage and misplaced values, not
//! forgery: whoever can write to the server can write valid entries, so the
//! server must be one the team trusts.
//!
//! ```no_run
//! use keepwarm::shared::{SharedConfig, SharedTier};
//! let tier = SharedTier::connect(
//!     SharedConfig::new("redis://127.0.0.1:6379")?,
//!     std::sync::Arc::new(|message: &str| eprintln!("{message}")),
//! )?;
//! let id = tier.id("my-plugin", "square", 0x1234, 0);
//! let counters = keepwarm::shared::Counters::default();
//! assert!(tier.get(&id, b"10", &counters).is_none()); // nothing there yet
//! # Ok::<(), String>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use xxhash_rust::xxh3::xxh3_64;

/// The default time a read may take before the call goes on without it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// The default namespace of the keys.
pub const DEFAULT_PREFIX: &str = "keepwarm";
/// The largest value read from the server (a longer one is refused from
/// its length, without being transferred): 64 MiB.
pub const MAX_VALUE: u64 = 64 << 20;
/// Entries waiting to be written, at most.
pub const QUEUE_ENTRIES: usize = 4096;
/// Bytes of values waiting to be written, at most: 64 MiB.
pub const QUEUE_BYTES: u64 = 64 << 20;
/// The header every shared value begins with.
pub const HEADER_LEN: usize = 48;
const MAGIC: &[u8; 4] = b"KWSH";
const FORMAT: u16 = 1;
/// Bytes asked for with the length, in the first round trip: values up to
/// this size take one.
const FIRST_READ: u64 = 64 << 10;
/// The first backoff after a failure, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a batch of writes, or a reset, may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const RESET_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the shared server.
#[derive(Debug, Clone)]
pub struct SharedConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT[/DB]` (or `rediss://`, `unix://`).
    pub url: String,
    /// The namespace every key begins with (`--shared-prefix`).
    pub prefix: String,
    /// How long a read may take (`--shared-timeout`).
    pub timeout: Duration,
}

impl SharedConfig {
    /// The server at `url`, with the default prefix and timeout; an error
    /// that names the URL when it is not one the client understands.
    pub fn new(url: &str) -> Result<SharedConfig, String> {
        redis::Client::open(url).map_err(|e| {
            format!("--shared {url:?} is not a Redis URL ({e}); expected redis://HOST:PORT[/DB]")
        })?;
        Ok(SharedConfig {
            url: url.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

/// The URL as it may be shown: a password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => format!("{}***{}", &url[..scheme + 3], &url[at..]),
            }
        }
        _ => url.to_owned(),
    }
}

/// The shared figures of one cache (`keepwarm stats`), counted by the
/// calls and by the writer.
#[derive(Debug, Default)]
pub struct Counters {
    /// Local misses the server answered with a valid entry.
    pub hits: AtomicU64,
    /// Local misses the server did not have (or could not be asked in time).
    pub misses: AtomicU64,
    /// Requests that failed or timed out, and values refused.
    pub errors: AtomicU64,
    /// Values that failed their checks (also in `errors`).
    pub refused: AtomicU64,
    /// Entries not queued for writing because the queue was full.
    pub queue_drops: AtomicU64,
    /// Entries the writer stored on the server.
    pub writes: AtomicU64,
}

impl Counters {
    fn add(n: &AtomicU64, by: u64) {
        n.fetch_add(by, Ordering::Relaxed);
    }

    /// A snapshot: hits, misses, errors, refused, queue drops, writes.
    pub fn snapshot(&self) -> [u64; 6] {
        [
            &self.hits,
            &self.misses,
            &self.errors,
            &self.refused,
            &self.queue_drops,
            &self.writes,
        ]
        .map(|n| n.load(Ordering::Relaxed))
    }
}

/// The identity under which one cache's entries are shared: the key prefix
/// `{prefix}:v1:{plugin}:{cache}:{code}:{shape}:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedId {
    key_prefix: Box<[u8]>,
    /// Where `{shape}:` begins: the prefix up to there names the code.
    code_len: usize,
}

impl SharedId {
    /// The Redis key of the entry `key`.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.key_prefix.len() + key.len());
        k.extend_from_slice(&self.key_prefix);
        k.extend_from_slice(key);
        k
    }

    /// The prefix up to the code (`{prefix}:v1:{plugin}:{cache}:{code}:`):
    /// every shape of this code.
    pub fn code_prefix(&self) -> &[u8] {
        &self.key_prefix[..self.code_len]
    }
}

/// A name as a key component: `%`, `:`, control characters and the glob
/// characters of `SCAN MATCH` are percent-encoded, so that components never
/// run into each other and a prefix is a literal pattern.
fn component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '%' | ':' | '*' | '?' | '[' | ']' | '\\') || c.is_control() || c == ' ' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Encodes a value for the server under `redis_key`: the header, then the
/// bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..4 | magic `KWSH` |
/// | 4..6 | format (1), little-endian |
/// | 6..8 | reserved (0) |
/// | 8..16 | xxh3-64 of the full Redis key |
/// | 16..24 | when it was computed, Unix milliseconds |
/// | 24..32 | what it cost to compute, nanoseconds |
/// | 32..40 | the value's length |
/// | 40..48 | xxh3-64 of bytes 0..40 and the value |
pub fn encode(redis_key: &[u8], value: &[u8], born_ms: u64, cost_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + value.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&xxh3_64(redis_key).to_le_bytes());
    out.extend_from_slice(&born_ms.to_le_bytes());
    out.extend_from_slice(&cost_ns.to_le_bytes());
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
    let sum = checksum(&out[..40], value);
    out.splice(40..40, sum.to_le_bytes());
    out
}

fn checksum(head: &[u8], value: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(head);
    h.update(value);
    h.digest()
}

/// A value read from the server that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// When it was computed, Unix milliseconds.
    pub born_ms: u64,
    /// What it cost to compute, nanoseconds.
    pub cost_ns: u64,
}

/// Checks `bytes` read under `redis_key` and takes the value out; the
/// reason when it is refused.
pub fn decode(redis_key: &[u8], mut bytes: Vec<u8>) -> Result<Decoded, &'static str> {
    if bytes.is_empty() {
        return Err("an empty value");
    }
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err("not a keepwarm value (no header)");
    }
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    if u16::from_le_bytes([bytes[4], bytes[5]]) != FORMAT || bytes[6..8] != [0, 0] {
        return Err("another format version");
    }
    if u64_at(&bytes, 8) != xxh3_64(redis_key) {
        return Err("the value belongs to another key or identity");
    }
    if u64_at(&bytes, 32) != (bytes.len() - HEADER_LEN) as u64 {
        return Err("the length does not match (truncated or padded)");
    }
    if u64_at(&bytes, 40) != checksum(&bytes[..40], &bytes[HEADER_LEN..]) {
        return Err("the checksum does not match");
    }
    let (born_ms, cost_ns) = (u64_at(&bytes, 16), u64_at(&bytes, 24));
    bytes.drain(..HEADER_LEN);
    Ok(Decoded {
        value: bytes,
        born_ms,
        cost_ns,
    })
}

/// What the tier says of itself (`keepwarm status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStatus {
    /// The server's URL, its password hidden.
    pub url: String,
    /// The key namespace.
    pub prefix: String,
    /// `connecting` (never reached yet), `connected`, or `down`.
    pub state: &'static str,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

impl SharedStatus {
    /// The status from its JSON object (`keepwarm status --json`'s `shared`).
    pub fn from_json(value: &serde_json::Value) -> Result<SharedStatus, String> {
        let text = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Ok(SharedStatus {
            url: text("url").ok_or("shared: no url")?,
            prefix: text("prefix").unwrap_or_default(),
            state: match text("state").as_deref() {
                Some("connected") => "connected",
                Some("down") => "down",
                _ => "connecting",
            },
            last_error: text("last_error"),
        })
    }
}

/// The health of the connection: the breaker.
struct Health {
    /// The pinger's wait before its next try.
    backoff: Duration,
    /// Whether the current outage was said.
    in_outage: bool,
    outage_since: Option<Instant>,
    ever_connected: bool,
    last_error: Option<String>,
}

/// One entry waiting to be written.
struct Write {
    key: Vec<u8>,
    value: Vec<u8>,
    ttl: Option<Duration>,
    counters: Arc<Counters>,
}

struct Inner {
    conn: ConnectionManager,
    url: String,
    prefix: String,
    timeout: Duration,
    health: Mutex<Health>,
    /// Set while the breaker is open: the fast path reads one atomic.
    down: AtomicBool,
    queued_bytes: AtomicU64,
    warn: Arc<dyn Fn(&str) + Send + Sync>,
    /// Where the pinger runs.
    runtime: tokio::runtime::Handle,
}

/// The shared tier: a Redis connection manager driven by a small runtime of
/// its own, a write-behind queue and its writer, and the breaker.
pub struct SharedTier {
    inner: Arc<Inner>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    queue: Mutex<Option<tokio::sync::mpsc::Sender<Write>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Whether an error means the server is out of reach (rather than a reply
/// it gave about one key).
fn is_outage(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

impl Inner {
    /// Whether a request may be sent: not during an outage (the pinger
    /// finds out when it is over).
    fn usable(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// A request failed because the server is out of reach: no request
    /// is sent until the pinger reaches it again (after 250 ms, then
    /// doubling to 5 s between tries).
    fn failed(self: &Arc<Self>, why: &str) {
        let mut h = self.health.lock();
        h.last_error = Some(why.to_owned());
        let was_down = self.down.swap(true, Ordering::Relaxed);
        if !was_down {
            h.backoff = BACKOFF_MIN;
            let me = Arc::clone(self);
            self.runtime
                .spawn(async move { me.ping_until_back().await });
        }
        if !h.in_outage {
            h.in_outage = true;
            h.outage_since = Some(Instant::now());
            drop(h);
            (self.warn)(&format!(
                "the shared tier {} is unreachable ({why}); calls answer from the local caches or compute, and it is retried with backoff (counted in shared_errors)",
                self.url
            ));
        }
    }

    /// A request was answered. It does not end an outage: an answer to a
    /// request sent before the server went away may arrive after the
    /// outage began; only the pinger ([`Inner::back`]) ends one.
    fn worked(&self) {
        if !self.down.load(Ordering::Relaxed) {
            let mut h = self.health.lock();
            if !h.ever_connected {
                h.ever_connected = true;
            }
        }
    }

    /// Keeps `error` as the last one `status` shows (a reply about one key,
    /// a refused value: not an outage).
    fn note(&self, error: String) {
        self.health.lock().last_error = Some(error);
    }

    /// The pinger reached the server again: the outage is over.
    fn back(&self) {
        let mut h = self.health.lock();
        h.ever_connected = true;
        h.backoff = BACKOFF_MIN;
        self.down.store(false, Ordering::Relaxed);
        if std::mem::take(&mut h.in_outage) {
            let since = h
                .outage_since
                .take()
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            drop(h);
            (self.warn)(&format!(
                "the shared tier {} is back after {since:.1} s",
                self.url
            ));
        }
    }
}

impl Inner {
    /// During an outage: tries the server after each backoff until it
    /// answers, then says it is back. (Each try also makes the connection
    /// manager reconnect; a failed connection's error is given once more,
    /// so a try is two pings.)
    async fn ping_until_back(self: Arc<Self>) {
        loop {
            let backoff = self.health.lock().backoff;
            tokio::time::sleep(backoff).await;
            for _ in 0..2 {
                let mut conn = self.conn.clone();
                let ping = redis::cmd("PING");
                if let Ok(Ok(_)) =
                    tokio::time::timeout(WRITE_TIMEOUT, ping.query_async::<String>(&mut conn)).await
                {
                    self.back();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut h = self.health.lock();
            h.backoff = (h.backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl SharedTier {
    /// Starts the tier for `config`: the connection is made in the
    /// background, so an unreachable server delays nothing (it is said once
    /// through `warn`, and retried). `Err` only when the runtime cannot
    /// start or the URL is not one.
    pub fn connect(
        config: SharedConfig,
        warn: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Result<SharedTier, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keepwarm-shared")
            // The runtime's threads are the host's, not a plugin's: a
            // generation retiring never waits on them.
            .on_thread_start(crate::threads::register_current)
            .enable_all()
            .build()
            .map_err(|e| format!("starting the shared tier's runtime: {e}"))?;
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("--shared {:?} is not a Redis URL ({e})", config.url))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = {
            let _entered = runtime.enter();
            ConnectionManager::new_lazy_with_config(client, manager_config)
                .map_err(|e| format!("the shared tier {}: {e}", redact(&config.url)))?
        };
        let inner = Arc::new(Inner {
            conn,
            url: redact(&config.url),
            prefix: component(&config.prefix),
            timeout: config.timeout,
            health: Mutex::new(Health {
                backoff: BACKOFF_MIN,
                in_outage: false,
                outage_since: None,
                ever_connected: false,
                last_error: None,
            }),
            down: AtomicBool::new(false),
            queued_bytes: AtomicU64::new(0),
            warn,
            runtime: runtime.handle().clone(),
        });
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_ENTRIES);
        let writer = runtime.spawn(write_behind(Arc::clone(&inner), rx));
        // Connect now, so that an unreachable server is said at start.
        {
            let inner = Arc::clone(&inner);
            runtime.spawn(async move {
                let mut conn = inner.conn.clone();
                let ping = redis::cmd("PING");
                match tokio::time::timeout(WRITE_TIMEOUT, ping.query_async::<String>(&mut conn))
                    .await
                {
                    Ok(Ok(_)) => inner.worked(),
                    Ok(Err(e)) => inner.failed(&e.to_string()),
                    Err(_) => inner.failed("no answer within 1 s"),
                }
            });
        }
        Ok(SharedTier {
            inner,
            runtime: Mutex::new(Some(runtime)),
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The identity of one cache's entries as computed by code `code` into
    /// values of shape `shape` (0: untagged), in the plugin `plugin`.
    pub fn id(&self, plugin: &str, cache: &str, code: u64, shape: u64) -> SharedId {
        let code_part = format!(
            "{}:v1:{}:{}:{code:016x}:",
            self.inner.prefix,
            component(plugin),
            component(cache)
        );
        let code_len = code_part.len();
        SharedId {
            key_prefix: format!("{code_part}{shape:016x}:").into_bytes().into(),
            code_len,
        }
    }

    /// Runs `fut` on the tier's runtime and waits for it at most `limit`
    /// (from any thread, even one inside another runtime: nothing here
    /// blocks on a runtime's own thread).
    fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let runtime = self.runtime.lock();
            let runtime = runtime.as_ref()?;
            runtime.spawn(async move {
                if let Ok(v) = tokio::time::timeout(limit, fut).await {
                    let _ = tx.send(v);
                }
            });
        }
        // A little longer than the runtime's own timeout: it answers first.
        rx.recv_timeout(limit + Duration::from_millis(20)).ok()
    }

    /// Asks the server for the entry `key` of `id`: the value when it is
    /// there and passes its checks. Counts a hit, a miss, an error or a
    /// refused value in `counters`. Takes at most the tier's timeout; asks
    /// nothing while the server is known to be down.
    pub fn get(&self, id: &SharedId, key: &[u8], counters: &Counters) -> Option<Decoded> {
        if !self.inner.usable() {
            Counters::add(&counters.misses, 1);
            return None;
        }
        let redis_key = id.key(key);
        let inner = Arc::clone(&self.inner);
        let k = redis_key.clone();
        let answer = self.run(self.inner.timeout, async move {
            let mut conn = inner.conn.clone();
            let (exists, len, head): (bool, u64, Vec<u8>) = redis::pipe()
                .cmd("EXISTS")
                .arg(&k)
                .cmd("STRLEN")
                .arg(&k)
                .cmd("GETRANGE")
                .arg(&k)
                .arg(0)
                .arg(FIRST_READ - 1)
                .query_async(&mut conn)
                .await?;
            if !exists {
                return Ok::<_, redis::RedisError>(None);
            }
            if len > MAX_VALUE || len <= head.len() as u64 {
                return Ok(Some((len, head)));
            }
            // Longer than the first read: the rest, as long as it is now
            // (it may have changed meanwhile; the checks decide).
            let rest: Vec<u8> = redis::cmd("GETRANGE")
                .arg(&k)
                .arg(head.len() as u64)
                .arg(MAX_VALUE - 1)
                .query_async(&mut conn)
                .await?;
            let mut whole = head;
            whole.extend_from_slice(&rest);
            Ok(Some((len, whole)))
        });
        match answer {
            None => {
                Counters::add(&counters.errors, 1);
                Counters::add(&counters.misses, 1);
                self.inner.failed(&format!(
                    "no answer within {} ms",
                    self.inner.timeout.as_millis()
                ));
                None
            }
            Some(Err(e)) => {
                Counters::add(&counters.errors, 1);
                Counters::add(&counters.misses, 1);
                if is_outage(&e) {
                    self.inner.failed(&e.to_string());
                } else {
                    self.inner.worked();
                    self.inner.note(e.to_string());
                }
                None
            }
            Some(Ok(None)) => {
                self.inner.worked();
                Counters::add(&counters.misses, 1);
                None
            }
            Some(Ok(Some((len, bytes)))) => {
                self.inner.worked();
                let checked = if len > MAX_VALUE {
                    Err("longer than 64 MiB")
                } else {
                    decode(&redis_key, bytes)
                };
                match checked {
                    Ok(d) => {
                        Counters::add(&counters.hits, 1);
                        Some(d)
                    }
                    Err(why) => {
                        Counters::add(&counters.refused, 1);
                        Counters::add(&counters.errors, 1);
                        Counters::add(&counters.misses, 1);
                        self.inner.note(format!(
                            "refused the value of {}: {why}",
                            String::from_utf8_lossy(&redis_key)
                        ));
                        None
                    }
                }
            }
        }
    }

    /// Queues the entry `key` of `id` for writing; never waits. A full queue
    /// (or a server known to be down) drops it, counted.
    pub fn put(
        &self,
        id: &SharedId,
        key: &[u8],
        value: &[u8],
        cost_ns: u64,
        ttl: Option<Duration>,
        counters: &Arc<Counters>,
    ) {
        let redis_key = id.key(key);
        let bytes = encode(&redis_key, value, crate::persist::now_ms(), cost_ns);
        let size = bytes.len() as u64 + redis_key.len() as u64;
        if self.inner.queued_bytes.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES {
            self.inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            Counters::add(&counters.queue_drops, 1);
            return;
        }
        let queue = self.queue.lock();
        let sent = queue.as_ref().is_some_and(|q| {
            q.try_send(Write {
                key: redis_key,
                value: bytes,
                ttl,
                counters: Arc::clone(counters),
            })
            .is_ok()
        });
        if !sent {
            self.inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            Counters::add(&counters.queue_drops, 1);
        }
    }

    /// Deletes every entry whose key begins with one of `prefixes` (each a
    /// [`SharedId::code_prefix`]); returns how many.
    pub fn drop_prefixes(&self, prefixes: Vec<Vec<u8>>) -> Result<u64, String> {
        let inner = Arc::clone(&self.inner);
        let dropped = self.run(RESET_TIMEOUT, async move {
            let mut conn = inner.conn.clone();
            let mut n = 0u64;
            for prefix in prefixes {
                let mut pattern = prefix;
                pattern.push(b'*');
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await?;
                    if !keys.is_empty() {
                        let gone: u64 = redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async(&mut conn)
                            .await?;
                        n += gone;
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            Ok::<u64, redis::RedisError>(n)
        });
        match dropped {
            Some(Ok(n)) => {
                self.inner.worked();
                Ok(n)
            }
            Some(Err(e)) => {
                if is_outage(&e) {
                    self.inner.failed(&e.to_string());
                }
                Err(format!("the shared tier {}: {e}", self.inner.url))
            }
            None => Err(format!(
                "the shared tier {} did not answer within {} s",
                self.inner.url,
                RESET_TIMEOUT.as_secs()
            )),
        }
    }

    /// What the tier says of itself.
    pub fn status(&self) -> SharedStatus {
        let h = self.inner.health.lock();
        SharedStatus {
            url: self.inner.url.clone(),
            prefix: self.inner.prefix.clone(),
            state: if self.inner.down.load(Ordering::Relaxed) {
                "down"
            } else if h.ever_connected {
                "connected"
            } else {
                "connecting"
            },
            last_error: h.last_error.clone(),
        }
    }

    /// Writes what is queued (for at most `limit`), then stops the writer
    /// and the runtime. Calls made afterwards ask nothing and queue nothing.
    pub fn close(&self, limit: Duration) {
        drop(self.queue.lock().take());
        let Some(runtime) = self.runtime.lock().take() else {
            return;
        };
        if let Some(writer) = self.writer.lock().take() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            runtime.spawn(async move {
                let _ = tokio::time::timeout(limit, writer).await;
                let _ = tx.send(());
            });
            let _ = rx.recv_timeout(limit + Duration::from_millis(50));
        }
        runtime.shutdown_timeout(Duration::from_millis(100));
    }
}

impl Drop for SharedTier {
    fn drop(&mut self) {
        self.close(Duration::from_millis(500));
    }
}

/// The writer: takes what is queued in batches of up to 64 and writes
/// each batch in one pipeline.
async fn write_behind(inner: Arc<Inner>, mut rx: tokio::sync::mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        let size: u64 = batch
            .iter()
            .map(|w| w.value.len() as u64 + w.key.len() as u64)
            .sum();
        inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        if !inner.usable() {
            for w in batch.drain(..) {
                Counters::add(&w.counters.errors, 1);
            }
            continue;
        }
        let mut pipe = redis::pipe();
        for w in &batch {
            let set = pipe.cmd("SET").arg(&w.key).arg(&w.value);
            if let Some(ttl) = w.ttl {
                set.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            set.ignore();
        }
        let mut conn = inner.conn.clone();
        match tokio::time::timeout(WRITE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                inner.worked();
                for w in batch.drain(..) {
                    Counters::add(&w.counters.writes, 1);
                }
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) if !is_outage(&e) => {
                        inner.note(e.to_string());
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    _ => Some(format!("a write took over {} s", WRITE_TIMEOUT.as_secs())),
                };
                if let Some(why) = why {
                    inner.failed(&why);
                }
                for w in batch.drain(..) {
                    Counters::add(&w.counters.errors, 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_every_damage_is_refused() {
        let key = b"keepwarm:v1:p:square:0000000000000001:0000000000000002:10";
        let encoded = encode(key, b"100", 7, 9);
        assert_eq!(&encoded[..4], b"KWSH");
        assert_eq!(encoded.len(), HEADER_LEN + 3);
        let d = decode(key, encoded.clone()).unwrap();
        assert_eq!(
            (d.value.as_slice(), d.born_ms, d.cost_ns),
            (&b"100"[..], 7, 9)
        );

        assert!(decode(b"other key", encoded.clone()).is_err(), "identity");
        assert!(
            decode(key, encoded[..encoded.len() - 1].to_vec()).is_err(),
            "truncated"
        );
        let mut padded = encoded.clone();
        padded.push(0);
        assert!(decode(key, padded).is_err(), "padded");
        for i in 0..encoded.len() {
            let mut flipped = encoded.clone();
            flipped[i] ^= 0x10;
            assert!(decode(key, flipped).is_err(), "byte {i} flipped");
        }
        assert!(decode(key, Vec::new()).is_err(), "empty");
        assert!(decode(key, vec![0xAB; 200]).is_err(), "random");
    }

    #[test]
    fn names_never_run_into_each_other_and_prefixes_are_literal_patterns() {
        assert_eq!(component("a:b"), "a%3Ab");
        assert_eq!(component("sq*[x]?"), "sq%2A%5Bx%5D%3F");
        assert_eq!(component("50%"), "50%25");
        assert_ne!(
            format!("{}:{}", component("a:b"), component("c")),
            format!("{}:{}", component("a"), component("b:c"))
        );
    }

    #[test]
    fn a_password_is_never_shown() {
        assert_eq!(redact("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://me:s3cret@h:1"), "redis://me:***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
