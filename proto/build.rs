//! Generates the gRPC code from `proto/` with protox (pure Rust), so building
//! needs no system `protoc`. Tensor byte fields become `bytes::Bytes` so they
//! are shared, not copied, between decode, forwarding and the engine. The services use
//! `codec::BoundedCodec` (prost's, with a decode-cost check) instead of prost's codec.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/inference/grpc_service.proto",
        "proto/tandem/v1/worker_control.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".inference")
        .codec_path("crate::codec::BoundedCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
