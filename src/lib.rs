//! chatvault: chat transcripts encrypted at rest under per-subject keys, with
//! crypto-shredding, served over gRPC. See README.md and SECURITY.md.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod export;
pub mod failpoint;
pub mod grpc;
pub mod keys;
pub mod metrics;
pub mod region;
pub mod retention;
pub mod router;
pub mod server;
pub mod store;
pub mod tenancy;
pub mod vault;
