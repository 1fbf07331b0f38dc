//! chatvault: chat transcripts encrypted at rest under per-subject keys, with
//! crypto-shredding, served over gRPC. See README.md and SECURITY.md.
#![forbid(unsafe_code)]

pub mod clock;
pub mod crypto;
pub mod keys;
pub mod store;
pub mod vault;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod server;
