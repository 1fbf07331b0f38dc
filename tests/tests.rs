//! chatvault's integration tests: one binary, real server processes on loopback,
//! real sled files in temporary directories.

mod suite;
