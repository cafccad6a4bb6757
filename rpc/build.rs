//! Compiles `proto/*.proto` with the protoc shipped by `protoc-bin-vendored`.
//!
//! The path is handed to prost-build through its own config, never through a global
//! `PROTOC` variable: raft-proto's rust-protobuf 2 build would pick that up and fail on
//! a protoc that is not 3.x (see DESIGN.md "Known pitfalls").

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                "proto/rangekv.proto",
                "proto/raft.proto",
                "proto/placement.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
