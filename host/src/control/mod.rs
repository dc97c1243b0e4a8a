//! Control of a running host from outside: the protocol, the socket server,
//! and one handler per command. (The client lives in `keepwarm-cli`.)

pub(crate) mod commands;
pub mod entries;
pub mod leases;
pub mod protocol;
pub mod server;

pub use commands::{handle, handle_in};
