//! One handler per command, one file each (as mini-redis lays them out).
//! The socket server and the prompt both come here, so a command behaves the
//! same wherever it is typed.

mod call;
mod entries;
mod reload;
mod reset;
mod stats;
mod status;

use super::protocol::{ErrorCode, Request, Response};
use crate::host::Host;

/// Carries out one request against `host` (a lease an entry command takes
/// ends with the request: use [`handle_in`] to keep it for a connection).
pub fn handle(host: &Host, request: Request) -> Response {
    handle_in(host, request, &super::leases::Session::new())
}

/// Carries out one request of the connection whose leases `session` holds.
pub fn handle_in(host: &Host, request: Request, session: &super::leases::Session) -> Response {
    match request {
        Request::Call {
            function,
            args,
            tag,
            ..
        } => crate::in_flight::with_tag(tag, || call::run(host, &function, &args)),
        Request::Reset {
            cache, all, shared, ..
        } => reset::run(host, cache.as_deref(), all, shared),
        Request::Stats { cache, .. } => stats::run(host, cache.as_deref()),
        Request::Status { .. } => status::run(host),
        Request::Reload { .. } => reload::run(host),
        Request::Entry { op, .. } => entries::run(host, op, session),
    }
}

/// How long a call waits for a build that landed to finish loading.
pub const CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// The response to a name that is no cache: the names there are.
fn unknown_cache(host: &Host, name: &str) -> Response {
    let names: Vec<String> = host
        .store()
        .all()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let known = if names.is_empty() {
        "there are no caches yet".to_owned()
    } else {
        format!("caches: {}", names.join(", "))
    };
    Response::err(
        ErrorCode::UnknownCache,
        format!("no cache named `{name}` ({known})"),
    )
}
