//! `status`: what is loaded.

use super::super::protocol::Response;
use crate::host::Host;

/// The host's status.
pub(super) fn run(host: &Host) -> Response {
    Response::ok(serde_json::to_value(host.status()).expect("status serializes"))
}
