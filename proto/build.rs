//! Compiles the .proto contracts with protox (pure Rust: no protoc needed).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for file in [
        "proto/agent.proto",
        "proto/broker.proto",
        "proto/state.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }

    let agent = protox::compile(["agent.proto"], ["proto"])?;
    prost_build::Config::new()
        .out_dir(&out_dir)
        // Keeps Setup, and so every HostMessage, small.
        .boxed(".moat.agent.v1.Setup.identity")
        .compile_fds(agent)?;

    // Before broker.proto, whose generated file (with the gRPC service when
    // enabled) must be the last one written.
    let state = protox::compile(["state.proto"], ["proto"])?;
    prost_build::Config::new()
        .out_dir(&out_dir)
        .extern_path(".moat.broker.v1", "crate::broker")
        .compile_fds(state)?;

    let broker = protox::compile(["broker.proto"], ["proto"])?;
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure()
            .out_dir(&out_dir)
            .compile_fds(broker)?;
    } else {
        prost_build::Config::new()
            .out_dir(&out_dir)
            .compile_fds(broker)?;
    }
    Ok(())
}
