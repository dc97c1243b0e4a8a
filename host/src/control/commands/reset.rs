//! `reset`: drops the entries of one cache, or of all.

use serde_json::json;

use super::super::protocol::{ErrorCode, Response};
use super::unknown_cache;
use crate::events::Event;
use crate::host::Host;

/// Resets `cache`, or every cache with `all`.
pub(super) fn run(host: &Host, cache: Option<&str>, all: bool) -> Response {
    match (cache, all) {
        (None, true) => {
            let dropped = host.reset_all();
            host.emit(&Event::Reset {
                cache: None,
                dropped,
            });
            Response::ok(json!({ "dropped": dropped }))
        }
        (Some(name), false) => match host.reset(name) {
            Some(dropped) => {
                host.emit(&Event::Reset {
                    cache: Some(name.to_owned()),
                    dropped,
                });
                Response::ok(json!({ "cache": name, "dropped": dropped }))
            }
            None => unknown_cache(host, name),
        },
        _ => Response::err(
            ErrorCode::BadRequest,
            "reset takes either a cache name or \"all\": true",
        ),
    }
}
