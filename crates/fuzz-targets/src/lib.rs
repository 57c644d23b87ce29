//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, as plain functions of the input
//! octets, so that the same code runs under libFuzzer (nightly, `cargo fuzz run NAME`) and on
//! stable Rust, where `tests/corpus.rs` replays every committed corpus file through them.
//!
//! Each function panics when an oracle fails; a panic is what libFuzzer reports as a crash.
//! None of them reads a clock, a random source or the file system, so an input always
//! behaves the same way.

mod address;
mod bdat;
mod client_reply;
mod command_line;
mod data_decoder;
pub mod heap;
mod replies;
mod sasl_exchange;
mod server_session;
mod util;

pub use address::address;
pub use bdat::bdat;
pub use client_reply::client_reply;
pub use command_line::command_line;
pub use data_decoder::data_decoder;
pub use sasl_exchange::sasl;
pub use server_session::server_session;

/// A target's name under `fuzz/fuzz_targets/` and `fuzz/corpus/`, and the target.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("command_line", command_line),
    ("address", address),
    ("data_decoder", data_decoder),
    ("bdat", bdat),
    ("server_session", server_session),
    ("sasl", sasl),
    ("client_reply", client_reply),
];
