//! Control of a running host from outside: the protocol, the socket server,
//! the client the CLI uses, and one handler per command.

pub mod client;
pub(crate) mod commands;
pub mod protocol;
pub mod server;

pub use commands::handle;
