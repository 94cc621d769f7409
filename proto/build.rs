//! Compiles `bazaar/v1/*.proto` with the protoc that the
//! `protoc-bin-vendored` crate ships, so no system protoc is needed, and
//! writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // SAFETY (edition 2021: set_var is safe): the build script is single-threaded.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("bazaar_descriptor.bin"))
        .compile_protos(&["bazaar/v1/bazaar.proto"], &["."])?;
    println!("cargo:rerun-if-changed=bazaar/v1/bazaar.proto");
    Ok(())
}
