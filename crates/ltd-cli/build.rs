//! Embeds the default model (`models/<name>/`, diffusers layout) into the binary, so that
//! `ltd-gen "a prompt"` works offline wherever the binary is. The folder is chosen by
//! `models/DEFAULT` (one line: the folder name). Without it the binary builds with no
//! embedded model and `ltd-gen` without `--model` explains that.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')) {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let models = manifest.join("../../models");
    let marker = models.join("DEFAULT");
    println!("cargo:rerun-if-changed={}", marker.display());
    let mut code = String::new();
    let name = std::fs::read_to_string(&marker).ok().map(|s| s.trim().to_string());
    let mut list = Vec::new();
    if let Some(name) = name.as_deref().filter(|n| !n.is_empty()) {
        let root = models.join(name);
        println!("cargo:rerun-if-changed={}", root.display());
        files(&root, &mut list);
        for f in &list {
            println!("cargo:rerun-if-changed={}", f.display());
        }
        // FNV-1a over paths and contents: names the extracted copy, so a new model never
        // reuses a stale one.
        let mut hash: u64 = 0xcbf29ce484222325;
        for f in &list {
            let bytes = std::fs::read(f).expect("readable model file");
            for b in
                f.strip_prefix(&root).expect("under root").to_string_lossy().bytes().chain(bytes)
            {
                hash = (hash ^ b as u64).wrapping_mul(0x100000001b3);
            }
        }
        writeln!(code, "/// A hash of the embedded files.").unwrap();
        writeln!(code, "pub const HASH: u64 = {hash:#x};").unwrap();
        writeln!(code, "/// The embedded default model's folder name.").unwrap();
        writeln!(code, "pub const NAME: &str = {name:?};").unwrap();
        writeln!(code, "/// (path inside the model folder, contents).").unwrap();
        writeln!(code, "pub const FILES: &[(&str, &[u8])] = &[").unwrap();
        for f in &list {
            let rel =
                f.strip_prefix(&root).expect("under root").to_string_lossy().replace('\\', "/");
            let abs = f.canonicalize().expect("file exists");
            writeln!(code, "    ({rel:?}, include_bytes!({:?})),", abs.to_string_lossy()).unwrap();
        }
        writeln!(code, "];").unwrap();
    } else {
        code.push_str("/// No default model was embedded.\npub const NAME: &str = \"\";\n");
        code.push_str("/// No hash.\npub const HASH: u64 = 0;\n");
        code.push_str("/// No files.\npub const FILES: &[(&str, &[u8])] = &[];\n");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets this"));
    std::fs::write(out.join("default_model.rs"), code).expect("OUT_DIR is writable");
}
