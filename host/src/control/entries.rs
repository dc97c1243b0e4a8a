//! The entry commands of the protocol: raw byte keys and values, for
//! clients that keep their own copies of entries (the Python package).
//! Keys and values travel as base64 strings in the JSON line (standard
//! alphabet, with padding); `docs/PROTOCOL.md`, "Entries", says why and
//! what it costs.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::json::Object;

/// The base64 flavour of `key` and `value`: the standard alphabet with
/// padding (RFC 4648 §4), as Python's `base64.b64encode` writes it.
pub const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Longest wait a `get_or_wait` may ask for, in seconds.
pub const MAX_WAIT_S: f64 = 300.0;
/// The wait of a `get_or_wait` that names none, in seconds.
pub const DEFAULT_WAIT_S: f64 = 60.0;

/// An entry command.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryOp {
    /// Creates the cache if needed; answers its slot in the epoch page.
    Open {
        /// The cache.
        cache: String,
        /// Entry bound the client asks for (`maxsize`), unless the user
        /// bounded the cache with `--cache`.
        max_entries: Option<u64>,
        /// The identity of the client's code for this cache (up to 16 hex
        /// digits, not 0): on a host with a shared tier, this connection's
        /// entries of the cache are shared under it. Without it they are
        /// not shared.
        code: Option<u64>,
    },
    /// Looks a key up.
    Get {
        /// The cache.
        cache: String,
        /// The key's bytes.
        key: Vec<u8>,
        /// Hits the client served from its own copies since it last said.
        hits: u64,
    },
    /// Looks a key up; on a miss, either leases the key to this connection
    /// (compute it, then `put`) or waits for the client that holds the lease.
    GetOrWait {
        /// The cache.
        cache: String,
        /// The key's bytes.
        key: Vec<u8>,
        /// Hits the client served from its own copies since it last said.
        hits: u64,
        /// Seconds to wait at most for another client's value.
        wait_s: f64,
    },
    /// Stores a value (and ends this connection's lease on the key).
    Put {
        /// The cache.
        cache: String,
        /// The key's bytes.
        key: Vec<u8>,
        /// The value's bytes.
        value: Vec<u8>,
        /// The stamp the lookup answered: the value is dropped when the
        /// cache was reset since.
        stamp: Option<u64>,
    },
    /// Gives a lease up without a value (the computation failed).
    Release {
        /// The cache.
        cache: String,
        /// The key's bytes.
        key: Vec<u8>,
    },
    /// The cache's figures, after counting the client's own hits.
    CacheInfo {
        /// The cache.
        cache: String,
        /// Hits the client served from its own copies since it last said.
        hits: u64,
    },
}

/// The entry commands, as `cmd` names them.
pub const COMMANDS: [&str; 6] = ["open", "get", "get_or_wait", "put", "release", "cache_info"];

/// The fields each entry command takes.
pub fn fields(cmd: &str) -> Option<&'static [&'static str]> {
    Some(match cmd {
        "open" => &["cmd", "v", "cache", "max_entries", "code"],
        "get" => &["cmd", "v", "cache", "key", "hits"],
        "get_or_wait" => &["cmd", "v", "cache", "key", "hits", "wait_s"],
        "put" => &["cmd", "v", "cache", "key", "value", "stamp"],
        "release" => &["cmd", "v", "cache", "key"],
        "cache_info" => &["cmd", "v", "cache", "hits"],
        _ => return None,
    })
}

fn bytes(o: &Object<'_>, field: &str) -> Result<Vec<u8>, String> {
    let text = o.str(field)?;
    BASE64.decode(text.as_bytes()).map_err(|e| {
        format!("`{field}` is not base64 ({e}); send the bytes in base64, standard alphabet with padding")
    })
}

fn cache_name(o: &Object<'_>) -> Result<String, String> {
    let name = o.str("cache")?;
    if name.is_empty() {
        return Err("`cache` is empty; name the cache".into());
    }
    Ok(name)
}

impl EntryOp {
    /// The command from its JSON object (whose `cmd` is one of [`COMMANDS`]
    /// and whose fields were checked against [`fields`]).
    pub(crate) fn from_object(cmd: &str, o: &Object<'_>) -> Result<EntryOp, String> {
        Ok(match cmd {
            "open" => EntryOp::Open {
                cache: cache_name(o)?,
                max_entries: match o.opt_u64("max_entries")? {
                    Some(0) => return Err("`max_entries` must be at least 1".into()),
                    n => n,
                },
                code: match o.opt_str("code")? {
                    None => None,
                    Some(hex) => Some(
                        u64::from_str_radix(&hex, 16)
                            .ok()
                            .filter(|&c| c != 0 && hex.len() <= 16 && !hex.starts_with('+'))
                            .ok_or_else(|| {
                                format!("`code` {hex:?} is not 1 to 16 hex digits (not all 0)")
                            })?,
                    ),
                },
            },
            "get" => EntryOp::Get {
                cache: cache_name(o)?,
                key: bytes(o, "key")?,
                hits: o.u64_or_0("hits")?,
            },
            "get_or_wait" => EntryOp::GetOrWait {
                cache: cache_name(o)?,
                key: bytes(o, "key")?,
                hits: o.u64_or_0("hits")?,
                wait_s: match o.opt_f64("wait_s")? {
                    None => DEFAULT_WAIT_S,
                    Some(w) if w.is_finite() && (0.0..=MAX_WAIT_S).contains(&w) => w,
                    Some(w) => {
                        return Err(format!(
                            "`wait_s` {w} is out of range; wait 0 to {MAX_WAIT_S} seconds"
                        ))
                    }
                },
            },
            "put" => EntryOp::Put {
                cache: cache_name(o)?,
                key: bytes(o, "key")?,
                value: bytes(o, "value")?,
                stamp: o.opt_u64("stamp")?,
            },
            "release" => EntryOp::Release {
                cache: cache_name(o)?,
                key: bytes(o, "key")?,
            },
            _ => EntryOp::CacheInfo {
                cache: cache_name(o)?,
                hits: o.u64_or_0("hits")?,
            },
        })
    }

    /// The command's `cmd` and its other fields, as JSON.
    pub fn to_json(&self) -> (&'static str, Value) {
        let b = |bytes: &[u8]| Value::String(BASE64.encode(bytes));
        match self {
            EntryOp::Open {
                cache,
                max_entries,
                code,
            } => {
                let mut body = json!({ "cache": cache });
                if let Some(n) = max_entries {
                    body["max_entries"] = json!(n);
                }
                if let Some(c) = code {
                    body["code"] = json!(format!("{c:016x}"));
                }
                ("open", body)
            }
            EntryOp::Get { cache, key, hits } => (
                "get",
                json!({ "cache": cache, "key": b(key), "hits": hits }),
            ),
            EntryOp::GetOrWait {
                cache,
                key,
                hits,
                wait_s,
            } => (
                "get_or_wait",
                json!({ "cache": cache, "key": b(key), "hits": hits, "wait_s": wait_s }),
            ),
            EntryOp::Put {
                cache,
                key,
                value,
                stamp,
            } => {
                let mut body = json!({ "cache": cache, "key": b(key), "value": b(value) });
                if let Some(s) = stamp {
                    body["stamp"] = json!(s);
                }
                ("put", body)
            }
            EntryOp::Release { cache, key } => {
                ("release", json!({ "cache": cache, "key": b(key) }))
            }
            EntryOp::CacheInfo { cache, hits } => {
                ("cache_info", json!({ "cache": cache, "hits": hits }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{parse_request, ErrorCode, Request};
    use super::*;

    #[test]
    fn entry_commands_round_trip() {
        for op in [
            EntryOp::Open {
                cache: "square".into(),
                max_entries: Some(10),
                code: Some(0x00ab_cdef_0123_4567),
            },
            EntryOp::Get {
                cache: "square".into(),
                key: vec![0, 255, b'\n'],
                hits: 3,
            },
            EntryOp::GetOrWait {
                cache: "square".into(),
                key: vec![],
                hits: 0,
                wait_s: 1.5,
            },
            EntryOp::Put {
                cache: "square".into(),
                key: b"k".to_vec(),
                value: vec![0; 100],
                stamp: Some(u64::MAX),
            },
            EntryOp::Release {
                cache: "square".into(),
                key: b"k".to_vec(),
            },
            EntryOp::CacheInfo {
                cache: "square".into(),
                hits: 7,
            },
        ] {
            let request = Request::Entry { v: Some(1), op };
            let line = serde_json::to_vec(&request.to_json()).unwrap();
            assert_eq!(parse_request(&line).unwrap(), request);
        }
    }

    #[test]
    fn bad_entry_requests_say_what_is_wrong() {
        for (line, says) in [
            (
                &br#"{"cmd":"get","cache":"s","key":"%%%"}"#[..],
                "not base64",
            ),
            (br#"{"cmd":"get","cache":"s"}"#, "missing field `key`"),
            (br#"{"cmd":"get","cache":"","key":""}"#, "`cache` is empty"),
            (
                br#"{"cmd":"put","cache":"s","key":"","value":5}"#,
                "`value`",
            ),
            (
                br#"{"cmd":"get","cache":"s","key":"","colour":1}"#,
                "unknown field `colour`",
            ),
            (
                br#"{"cmd":"get_or_wait","cache":"s","key":"","wait_s":1e9}"#,
                "out of range",
            ),
            (
                br#"{"cmd":"open","cache":"s","max_entries":0}"#,
                "at least 1",
            ),
        ] {
            let e = parse_request(line).unwrap_err().error.unwrap();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains(says), "{}: {}", says, e.message);
        }
    }
}
