//! `stats`: the figures of every cache, or of one.

use super::super::protocol::Response;
use super::unknown_cache;
use crate::host::Host;

/// The figures of `cache`, or of every cache.
pub(super) fn run(host: &Host, cache: Option<&str>) -> Response {
    match host.stats(cache) {
        Some(stats) => Response::ok(serde_json::to_value(stats).expect("figures serialize")),
        None => unknown_cache(host, cache.unwrap_or_default()),
    }
}
