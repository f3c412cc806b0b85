//! `tandem-worker` library: the code shared by both roles ([`common`],
//! [`config`]) and the preprocess role ([`preprocess`]). The binary in
//! `main.rs` dispatches the roles; integration tests drive the library.

pub mod common;
pub mod config;
pub mod preprocess;
