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
    table(manifest, "[dependencies]")
}

/// The crate graph's rules from ARCHITECTURE.md, as a list of violations (empty = fine):
/// `deps` maps each workspace crate to the names in its `[dependencies]`.
fn dependency_direction_violations(deps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut out = Vec::new();
    let none = Vec::new();
    let ltd = |c: &str| -> Vec<&str> {
        deps.get(c)
            .unwrap_or(&none)
            .iter()
            .map(String::as_str)
            .filter(|d| d.starts_with("ltd-"))
            .collect()
    };
    if !ltd("ltd-nn").is_empty() {
        out.push(format!("ltd-nn depends on no ltd crate, but has {:?}", ltd("ltd-nn")));
    }
    for model in ["ltd-text", "ltd-unet", "ltd-vae", "ltd-scheduler"] {
        if ltd(model) != ["ltd-nn"] {
            out.push(format!("{model} stands on ltd-nn alone, but has {:?}", ltd(model)));
        }
    }
    // The pipeline and the trainer stand on the model crates; neither knows the other or the
    // CLI (the trainer may use the pipeline in its tests: dev-dependencies are not read here).
    let forbidden: [(&str, &[&str]); 2] =
        [("ltd-pipeline", &["ltd-cli", "ltd-train"]), ("ltd-train", &["ltd-cli", "ltd-pipeline"])];
    for (c, banned) in forbidden {
        for d in ltd(c) {
            if banned.contains(&d) {
                out.push(format!("{c} must not depend on {d}"));
            }
        }
    }
    for (c, ds) in deps {
        let has = |name: &str| ds.iter().any(|d| d == name);
        if has("clap") && c != "ltd-cli" && c != "xtask" {
            out.push(format!("only ltd-cli and xtask know clap, not {c}"));
        }
        if has("image") && !["ltd-cli", "xtask", "ltd-train"].contains(&c.as_str()) {
            out.push(format!(
                "only ltd-cli, xtask and the trainer's datasets read image files, not {c}"
            ));
        }
        if has("hf-hub") && c != "ltd-pipeline" {
            out.push(format!("only the pipeline knows the hub, not {c}"));
        }
    }
    out
}

/// The workspace crates (and xtask) with their `[dependencies]`.
fn workspace_dependencies() -> BTreeMap<String, Vec<String>> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        deps.insert(name, dependencies(&entry.path().join("Cargo.toml")));
    }
    deps.insert("xtask".into(), dependencies(&root().join("xtask/Cargo.toml")));
    deps
}

#[test]
fn crate_dependencies_point_downwards() {
    let violations = dependency_direction_violations(&workspace_dependencies());
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The rule itself must catch what it is for: each broken graph below is reported (the old
/// `a || b && c` test let the trainer depend on the pipeline).
#[test]
fn dependency_rule_catches_upward_edges() {
    let good = workspace_dependencies();
    assert!(dependency_direction_violations(&good).is_empty());
    let broken = [
        ("ltd-train", "ltd-pipeline"),
        ("ltd-train", "ltd-cli"),
        ("ltd-pipeline", "ltd-train"),
        ("ltd-pipeline", "ltd-cli"),
        ("ltd-nn", "ltd-unet"),
        ("ltd-unet", "ltd-vae"),
        ("ltd-scheduler", "clap"),
        ("ltd-vae", "image"),
        ("ltd-text", "hf-hub"),
    ];
    for (from, to) in broken {
        let mut deps = good.clone();
        deps.get_mut(from).unwrap().push(to.to_string());
        let v = dependency_direction_violations(&deps);
        assert!(!v.is_empty(), "{from} -> {to} went unnoticed");
    }
}

/// The dependency names in one table of a manifest (`[dependencies]`, `[dev-dependencies]`, …).
fn table(manifest: &Path, header: &str) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = l == header;
            continue;
        }
        if inside && !l.is_empty() && !l.starts_with('#') {
            if let Some((name, _)) = l.split_once('=') {
                out.push(name.trim().split('.').next().unwrap().to_string());
            }
        }
    }
    out
}

/// Concatenated text of the Rust files under `dirs` (relative to `base`).
fn text_under(base: &Path, dirs: &[&str]) -> String {
    let mut files = Vec::new();
    for d in dirs {
        let p = base.join(d);
        if p.is_file() {
            files.push(p);
        } else {
            rust_files(&p, &mut files);
        }
    }
    files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect::<Vec<_>>().join("\n")
}

/// Whether Rust source `text` names crate `dep` (as a path, a `use` or `extern crate`).
fn mentions(text: &str, dep: &str) -> bool {
    let id = dep.replace('-', "_");
    text.match_indices(&id).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = &text[i + id.len()..];
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && (after.starts_with("::") || after.starts_with(';') || after.starts_with(" as "))
    })
}

/// Every declared dependency is used: `[dependencies]` by the crate's own code (src/, build.rs),
/// `[dev-dependencies]` by any of its targets; every `[workspace.dependencies]` entry by some
/// member. (What `cargo machete` checks, without installing it.)
#[test]
fn no_unused_dependencies() {
    let mut unused = Vec::new();
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("Cargo.toml"))
        .collect();
    manifests.push(root().join("xtask/Cargo.toml"));
    let mut used_anywhere = std::collections::BTreeSet::new();
    for manifest in &manifests {
        let dir = manifest.parent().unwrap();
        let lib = text_under(dir, &["src", "build.rs"]);
        let all = text_under(dir, &["src", "build.rs", "tests", "examples", "benches"]);
        for dep in table(manifest, "[dependencies]") {
            if !mentions(&lib, &dep) {
                unused.push(format!("{}: [dependencies] {dep}", rel(manifest)));
            }
            used_anywhere.insert(dep);
        }
        for dep in table(manifest, "[dev-dependencies]") {
            if !mentions(&all, &dep) {
                unused.push(format!("{}: [dev-dependencies] {dep}", rel(manifest)));
            }
            used_anywhere.insert(dep);
        }
        for dep in table(manifest, "[build-dependencies]") {
            used_anywhere.insert(dep);
        }
    }
    for dep in table(&root().join("Cargo.toml"), "[workspace.dependencies]") {
        if !used_anywhere.contains(&dep) {
            unused.push(format!("Cargo.toml: [workspace.dependencies] {dep} (no member uses it)"));
        }
    }
    assert!(unused.is_empty(), "declared but unused:\n{}", unused.join("\n"));
}

#[test]
fn unused_dependency_check_sees_uses() {
    assert!(mentions("use serde::Deserialize;", "serde"));
    assert!(mentions("#[derive(thiserror::Error)]", "thiserror"));
    assert!(mentions("let x = candle_core::Tensor::zeros(...)", "candle-core"));
    assert!(mentions("extern crate half;", "half"));
    assert!(!mentions("use serde_json::Value;", "serde"));
    assert!(!mentions("// regex is not used", "regex"));
    assert!(!mentions("my_rand::x()", "rand"));
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

/// Lines of test code (test targets and `#[cfg(test)]` modules) that read the environment: a
/// test that returns early unless a variable is set passes having run nothing. Slow checks go
/// behind a feature's `required-features` and `cargo xtask big-tests` instead. A line may say
/// why it is fine with `// tidy: env-ok (reason)`.
fn env_reads_in_tests(path: &str, text: &str) -> Vec<String> {
    let test_target = path.contains("/tests/");
    let test_code =
        if test_target { text } else { text.split_once("#[cfg(test)]").map_or("", |(_, t)| t) };
    let offset = text.len() - test_code.len();
    let first_line = text[..offset].lines().count();
    test_code
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            !l.starts_with("//")
                && (l.contains("env::var(") || l.contains("env::var_os("))
                && !l.contains("tidy: env-ok")
        })
        .map(|(i, l)| format!("{path}:{}: {}", first_line + i + 1, l.trim()))
        .collect()
}

#[test]
fn tests_do_not_skip_on_environment_variables() {
    let me = Path::new(file!()).file_name().unwrap().to_owned();
    let mut hits = Vec::new();
    for p in sources() {
        if p.file_name() == Some(me.as_os_str()) {
            continue;
        }
        hits.extend(env_reads_in_tests(&rel(&p), &std::fs::read_to_string(&p).unwrap()));
    }
    assert!(hits.is_empty(), "test code reads the environment:\n{}", hits.join("\n"));
}

#[test]
fn env_rule_catches_the_old_big_memory_gate() {
    let old = "#[test]\nfn big() {\n    if std::env::var(\"LTD_BIG_TESTS\").as_deref() != Ok(\"1\") {\n        return;\n    }\n}\n";
    assert_eq!(env_reads_in_tests("crates/ltd-unet/tests/big_memory.rs", old).len(), 1);
    let lib = "fn f() { std::env::var(\"X\"); }\n#[cfg(test)]\nmod tests {}\n";
    assert!(env_reads_in_tests("crates/ltd-nn/src/device.rs", lib).is_empty());
}
