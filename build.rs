//! Generates the tether.v1 Rust code from `proto/` with protox, so a fresh
//! machine needs no system `protoc`. The encoded descriptor set is written
//! next to the generated code and feeds server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/tether/v1/queue.proto", "proto/tether/v1/agent.proto"];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tether_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The AgentService.Connect RPC would collide with the generated
        // `connect` constructor; clients use `XClient::new(channel)`.
        .build_transport(false)
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
