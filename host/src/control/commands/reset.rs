//! `reset`: drops the entries of one cache, or of all.

use serde_json::json;

use super::super::protocol::{ErrorCode, Response};
use super::unknown_cache;
use crate::events::Event;
use crate::host::Host;

/// Resets `cache`, or every cache with `all`; with `shared`, drops the
/// shared tier's entries of their current code too (the local reset
/// happens first, whatever the server does).
///
/// The answer says what happened to the shared tier: `shared_dropped` (a
/// count) with `shared`; `shared_kept: true` without it on a host that has
/// a shared tier (its entries of this code stay, and a local miss finds
/// them again).
pub(super) fn run(host: &Host, cache: Option<&str>, all: bool, shared: bool) -> Response {
    let caches = match (cache, all) {
        (None, true) => host.store().all(),
        (Some(name), false) => match host.store().get(name) {
            Some(c) => vec![c],
            None => return unknown_cache(host, name),
        },
        _ => {
            return Response::err(
                ErrorCode::BadRequest,
                "reset takes either a cache name or \"all\": true",
            )
        }
    };
    let dropped = match cache {
        None => host.reset_all(),
        Some(name) => host.reset(name).unwrap_or(0),
    };
    host.emit(&Event::Reset {
        cache: cache.map(str::to_owned),
        dropped,
    });
    let mut answer = match cache {
        None => json!({ "dropped": dropped }),
        Some(name) => json!({ "cache": name, "dropped": dropped }),
    };
    if shared {
        match host.reset_shared(&caches) {
            Ok(n) => answer["shared_dropped"] = json!(n),
            Err(e) => answer["shared_error"] = json!(e),
        }
    } else if host.store().shared().is_some() {
        answer["shared_kept"] = json!(true);
    }
    Response::ok(answer)
}
