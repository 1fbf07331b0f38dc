//! Compiles proto/ with protox (pure Rust), so building needs no system protoc.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/chatvault/v1/transcript.proto",
    "proto/chatvault/v1/subject.proto",
    "proto/chatvault/v1/export.proto",
    "proto/chatvault/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build 0.14 no longer emits these itself.
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("chatvault_descriptor.bin"), fds.encode_to_vec())?;
    // Every service decodes with the project's codec: a bad request is INVALID_ARGUMENT.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::grpc::codec::StrictCodec")
        .compile_fds(fds)?;

    // The load benchmark's echo service: compiled apart so it never joins the public API.
    println!("cargo:rerun-if-changed=benches/proto/echo.proto");
    let echo = protox::compile(["benches/proto/echo.proto"], ["benches/proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(echo)?;
    Ok(())
}
