//! Tidy as a test: the conventions of STYLE.md and the invariants of ARCHITECTURE.md that a
//! machine can check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// All Rust sources of the crates and xtask.
fn sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        rust_files(&entry.path(), &mut out);
    }
    rust_files(&root().join("xtask"), &mut out);
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

#[test]
fn every_source_file_has_a_module_doc() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "src"))
        .filter(|p| !std::fs::read_to_string(p).unwrap().trim_start().starts_with("//!"))
        .map(|p| rel(&p))
        .collect();
    assert!(missing.is_empty(), "files without a `//!` module doc: {missing:?}");
}

#[test]
fn no_ignored_tests_stubs_or_should_panic() {
    let me = Path::new(file!()).file_name().unwrap().to_owned();
    let banned = ["#[ignore", "#[should_panic", "todo!(", "unimplemented!(", "dbg!("];
    let mut hits = Vec::new();
    for p in sources() {
        if p.file_name() == Some(me.as_os_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for (i, line) in text.lines().enumerate() {
            if banned.iter().any(|b| line.contains(b)) {
                hits.push(format!("{}:{}: {}", rel(&p), i + 1, line.trim()));
            }
        }
    }
    assert!(hits.is_empty(), "{}", hits.join("\n"));
}

#[test]
fn libraries_never_print() {
    let mut hits = Vec::new();
    for p in sources() {
        let s = rel(&p);
        let library = s.starts_with("crates/")
            && !s.starts_with("crates/ltd-cli/")
            && s.contains("/src/")
            && !s.ends_with("/build.rs");
        if !library {
            continue;
        }
        // Unit-test modules may print; everything above `#[cfg(test)]` may not.
        let text = std::fs::read_to_string(&p).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") {
                continue;
            }
            if ["println!(", "eprintln!(", "print!(", "eprint!("].iter().any(|m| l.contains(m)) {
                hits.push(format!("{s}:{}: {}", i + 1, l));
            }
        }
    }
    assert!(hits.is_empty(), "library code prints (use tracing):\n{}", hits.join("\n"));
}

/// `[dependencies]` names of a manifest (not dev- or build-dependencies).
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l == "[dependencies]";
            continue;
        }
        if in_deps && !l.is_empty() && !l.starts_with('#') {
            if let Some((name, _)) = l.split_once('=') {
                out.push(name.trim().split('.').next().unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn crate_dependencies_point_downwards() {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        deps.insert(name, dependencies(&entry.path().join("Cargo.toml")));
    }
    deps.insert("xtask".into(), dependencies(&root().join("xtask/Cargo.toml")));
    let ltd = |c: &str| -> Vec<String> {
        deps[c].iter().filter(|d| d.starts_with("ltd-")).cloned().collect()
    };
    assert!(ltd("ltd-nn").is_empty(), "ltd-nn depends on no ltd crate: {:?}", ltd("ltd-nn"));
    for model in ["ltd-text", "ltd-unet", "ltd-vae", "ltd-scheduler"] {
        assert_eq!(ltd(model), ["ltd-nn"], "{model} stands on ltd-nn alone");
    }
    for c in ["ltd-pipeline", "ltd-train"] {
        assert!(
            !ltd(c).iter().any(|d| d == "ltd-cli" || d == "ltd-pipeline" && c == "ltd-pipeline"),
            "{c}: {:?}",
            ltd(c)
        );
    }
    assert!(!ltd("ltd-pipeline").contains(&"ltd-train".to_string()));
    assert!(ltd("ltd-test-support").is_empty(), "every crate's tests may use ltd-test-support");
    for (c, ds) in &deps {
        assert!(
            !ds.iter().any(|d| d == "ltd-test-support"),
            "{c}: ltd-test-support is a dev-dependency only"
        );
        if ds.iter().any(|d| d == "clap") {
            assert!(c == "ltd-cli" || c == "xtask", "only ltd-cli and xtask know clap, not {c}");
        }
        if ds.iter().any(|d| d == "image") {
            assert!(
                c == "ltd-cli" || c == "xtask" || c == "ltd-train",
                "only ltd-cli, xtask and the trainer's datasets read image files, not {c}"
            );
        }
        if ds.iter().any(|d| d == "hf-hub") {
            assert_eq!(c, "ltd-pipeline", "only the pipeline knows the hub");
        }
    }
}

#[test]
fn fixture_sections_exist() {
    let gen = std::fs::read_to_string(root().join("tests/fixtures/generate.py")).unwrap();
    for line in gen.lines().filter(|l| l.starts_with("SECTIONS") || l.starts_with("OPTIONAL")) {
        for name in line.split('"').skip(1).step_by(2) {
            let path = root().join("tests/fixtures/gen").join(format!("{name}.py"));
            assert!(
                path.is_file(),
                "generate.py lists section {name} but {} is missing",
                rel(&path)
            );
        }
    }
}
