//! Generates the tether.v1 Rust code from `proto/` with protox, so a fresh
//! machine needs no system `protoc`. The encoded descriptor set is written
//! next to the generated code and feeds server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tether/v1/queue.proto",
        "proto/tether/v1/agent.proto",
        "proto/tether/v1/dashboard.proto",
        "proto/tether/v1/replica.proto",
        "proto/tether/v1/rules.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).open_files(files)?;
    // Encoded by protox itself: prost's descriptor types would drop the
    // custom field options (the input rules) that reflection and the rules
    // test read.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tether_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    let descriptors = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The AgentService.Connect RPC would collide with the generated
        // `connect` constructor; clients use `XClient::new(channel)`.
        .build_transport(false)
        .bytes(".")
        // Small per-call buffers (src/codec.rs): agents hold streams for days.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
