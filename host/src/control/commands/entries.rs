//! The entry commands (`open`, `get`, `get_or_wait`, `put`, `release`,
//! `cache_info`): raw byte keys and values for clients that keep their own
//! copies of entries and check them against the epoch page.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use super::super::entries::{EntryOp, BASE64};
use super::super::leases::{self, Lookup, Session};
use super::super::protocol::{Response, MAX_REQUEST_BYTES};
use super::unknown_cache;
use crate::cache::{Bounds, Cache, PutError};
use crate::host::Host;

/// The stamp a client is told for `cache` at `epoch`: the one the epoch
/// page shows for it, or the bare epoch when the cache has no slot there.
fn stamp(host: &Host, cache: &Cache, epoch: u64) -> u64 {
    match host.epoch_page() {
        Some(page) if page.stamp(cache, epoch) != 0 => page.stamp(cache, epoch),
        _ => epoch,
    }
}

/// The epoch a client's stamp stands for (see [`stamp`]).
fn epoch_of(host: &Host, cache: &Cache, stamp: u64) -> u64 {
    host.epoch_page()
        .and_then(|page| page.epoch_of(cache, stamp))
        .unwrap_or(stamp)
}

fn found(host: &Host, cache: &Cache, epoch: u64, value: Option<&[u8]>) -> serde_json::Value {
    let mut result = json!({
        "found": value.is_some(),
        "stamp": stamp(host, cache, epoch),
        "instance": host.epoch_page().map(|p| p.instance()),
    });
    if let Some(v) = value {
        result["value"] = json!(BASE64.encode(v));
    }
    result
}

/// The plugin name in the shared identity of a protocol client's entries.
pub const SERVE_PLUGIN: &str = "serve";

/// After a local miss: the entry from the shared tier, when this
/// connection opened the cache with a code and the tier has it (stored
/// locally, and counted as a hit).
fn shared_fetch(host: &Host, c: &Cache, key: &[u8], session: &Session) -> Option<Arc<[u8]>> {
    let tier = host.store().shared()?;
    let id = session.shared_id(c.name())?;
    c.shared_fetch(crate::cache::SharedLookup { tier, id: &id }, key)
}

/// Carries out one entry command for the connection of `session`.
pub(super) fn run(host: &Host, op: EntryOp, session: &Session) -> Response {
    let store = host.store();
    match op {
        EntryOp::Open {
            cache,
            max_entries,
            code,
        } => {
            let c = store.cache(&cache);
            if let (Some(code), Some(tier)) = (code, store.shared()) {
                // The plugin part of a protocol client's identity: `serve`.
                let id = tier.id(SERVE_PLUGIN, &cache, code, 0);
                c.register_shared(0, &id);
                session.share(&cache, id);
            }
            if let Some(n) = max_entries.and_then(|n| usize::try_from(n).ok()) {
                if let Some(max_entries) = std::num::NonZeroUsize::new(n) {
                    let bounds = Bounds {
                        max_entries,
                        ..c.bounds()
                    };
                    store.declare(&cache, Some(bounds), 0);
                }
            }
            let page = host.epoch_page();
            let slot = page.and_then(|p| p.slot(&c));
            Response::ok(json!({
                "cache": cache,
                "slot": slot,
                "stamp": stamp(host, &c, c.epoch()),
                "instance": page.map(|p| p.instance()),
                "page": page.map(|p| p.path().display().to_string()),
                "capacity": c.bounds().max_entries.get(),
                "max_request_bytes": MAX_REQUEST_BYTES,
            }))
        }
        EntryOp::Get { cache, key, hits } => {
            let c = store.cache(&cache);
            c.count_hits(hits);
            let epoch = c.epoch();
            let value = c
                .get(&key)
                .or_else(|| shared_fetch(host, &c, &key, session));
            Response::ok(found(host, &c, epoch, value.as_deref()))
        }
        EntryOp::GetOrWait {
            cache,
            key,
            hits,
            wait_s,
        } => {
            let c = store.cache(&cache);
            c.count_hits(hits);
            let epoch = c.epoch();
            let wait = Duration::from_secs_f64(wait_s);
            let lookup = match leases::get_or_wait(&c, &key, session, wait) {
                // This connection would compute: the shared tier may have it.
                Lookup::Leased => match shared_fetch(host, &c, &key, session) {
                    Some(v) => {
                        leases::landed(&c, &key, Arc::clone(&v));
                        Lookup::Found(v)
                    }
                    None => Lookup::Leased,
                },
                other => other,
            };
            match lookup {
                Lookup::Found(v) => Response::ok(found(host, &c, epoch, Some(&v))),
                lookup => {
                    let mut result = found(host, &c, epoch, None);
                    result["lease"] = json!(matches!(lookup, Lookup::Leased));
                    Response::ok(result)
                }
            }
        }
        EntryOp::Put {
            cache,
            key,
            value,
            stamp,
        } => {
            let c = store.cache(&cache);
            let stored = match stamp {
                Some(s) => c.put_in_epoch(&key, &value, epoch_of(host, &c, s)),
                None => c.put(&key, &value).map(|()| true),
            };
            if let (Ok(true), Some(id), Some(tier)) =
                (&stored, session.shared_id(&cache), store.shared())
            {
                tier.put(&id, &key, &value, 0, None, c.shared_counters());
            }
            // Waiters get the value even when it is not kept.
            leases::landed(&c, &key, Arc::from(value));
            match stored {
                Ok(stored) => Response::ok(json!({ "stored": stored })),
                Err(PutError::TooLarge) => Response::ok(json!({
                    "stored": false,
                    "reason": format!("the entry is larger than the cache's byte bound ({} bytes)",
                        c.bounds().max_bytes.unwrap_or(0)),
                })),
            }
        }
        EntryOp::Release { cache, key } => {
            let c = store.cache(&cache);
            Response::ok(json!({ "released": leases::release(&c, &key, session) }))
        }
        EntryOp::CacheInfo { cache, hits } => match store.get(&cache) {
            Some(c) => {
                c.count_hits(hits);
                Response::ok(serde_json::to_value(c.stats_with_store()).expect("figures serialize"))
            }
            None => unknown_cache(host, &cache),
        },
    }
}
