//! Writes the CustomResourceDefinitions into a directory (`crds/`), or with
//! `--check` fails when the files there differ from the Rust types.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

const USAGE: &str = "usage: crdgen [--check] DIR\n\n\
Writes the PayloadPool and PayloadPolicy CRDs, generated from the operator's\n\
Rust types, into DIR (one YAML file each). With --check, writes nothing and\n\
exits 1 naming every file that is missing or differs: run `make crds`.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (check, dir) = match args.as_slice() {
        [flag, dir] if flag == "--check" => (true, dir),
        [dir] if !dir.starts_with('-') => (false, dir),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(check, PathBuf::from(dir)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("crdgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// True when every file is (now) current.
fn run(check: bool, dir: PathBuf) -> anyhow::Result<bool> {
    let mut current = true;
    for (name, crd) in payload_operator::crd::all() {
        let yaml = payload_operator::crd::yaml(&crd).context("writing a CRD as YAML")?;
        let path = dir.join(name);
        if check {
            let found = std::fs::read_to_string(&path).unwrap_or_default();
            if found != yaml {
                eprintln!("{} is not what the Rust types say: run `make crds`", path.display());
                current = false;
            }
        } else {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(current)
}
