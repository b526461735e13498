//! Compiles the v1 contract with protox (pure Rust), so a fresh machine needs no
//! `protoc` to build the workspace.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    collect_protos(&root.join("payload"), &mut files)?;
    files.sort();
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|f| f.strip_prefix(&root).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;
    let fds = protox::compile(&relative, [&root])?;
    tonic_prost_build::configure()
        .include_file("payload_v1.rs")
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=payload");
    Ok(())
}
