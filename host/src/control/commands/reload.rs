//! `reload`: reloads every plugin now, without waiting for a file change.

use serde_json::json;

use super::super::protocol::{ErrorCode, Response};
use crate::host::{Host, Reloaded};

/// Reloads now.
pub(super) fn run(host: &Host) -> Response {
    match host.reload(true) {
        Ok(Reloaded::Loaded { generation, reset }) => {
            Response::ok(json!({ "generation": generation, "reset": reset }))
        }
        Ok(Reloaded::Unchanged) => Response::ok(json!({ "unchanged": true })),
        Err(e) => {
            let serving = host.current().map_or(0, |g| g.number);
            Response::err(
                ErrorCode::ReloadFailed,
                format!("reload failed: {e} (generation {serving} keeps serving)"),
            )
        }
    }
}
