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
    let forbidden: [(&str, &[&str]); 2] = [
        ("ltd-pipeline", &["ltd-cli", "ltd-train", "ltd-serve"]),
        ("ltd-train", &["ltd-cli", "ltd-pipeline", "ltd-serve"]),
    ];
    for (c, banned) in forbidden {
        for d in ltd(c) {
            if banned.contains(&d) {
                out.push(format!("{c} must not depend on {d}"));
            }
        }
    }
    if !ltd("ltd-test-support").is_empty() {
        out.push(
            "ltd-test-support depends on no ltd crate (every crate's tests may use it)".into(),
        );
    }
    for (c, ds) in deps {
        let has = |name: &str| ds.iter().any(|d| d == name);
        if has("ltd-test-support") {
            out.push(format!("{c}: ltd-test-support is a dev-dependency only"));
        }
        // The front ends: ltd-serve shares ltd-cli's flags (ltd-cli is a library too).
        if has("clap") && !["ltd-cli", "ltd-serve", "xtask"].contains(&c.as_str()) {
            out.push(format!("only ltd-cli, ltd-serve and xtask know clap, not {c}"));
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
        ("ltd-pipeline", "ltd-serve"),
        ("ltd-serve", "image"),
        ("ltd-nn", "ltd-unet"),
        ("ltd-unet", "ltd-vae"),
        ("ltd-scheduler", "clap"),
        ("ltd-vae", "image"),
        ("ltd-text", "hf-hub"),
        ("ltd-vae", "ltd-test-support"),
        ("ltd-test-support", "ltd-nn"),
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

// ---------------------------------------------------------------------------------------------
// ltd-nn's invariants: its layers are shared, its modules form no circle, its kernels are
// together. These read Rust sources as tokens: comments, strings and `#[cfg(test)]` items are
// dropped first, then `use` trees and paths are expanded.

/// The crates standing on ltd-nn alone, whose sharing justifies a layer in `ltd_nn::layers`.
const MODEL_CRATES: [&str; 4] = ["ltd-text", "ltd-unet", "ltd-vae", "ltd-scheduler"];

/// A token of Rust code and the line it is on.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

/// Rust code without comments, with every string and char literal emptied (newlines kept, so
/// line numbers stay right).
fn strip_comments_and_literals(code: &str) -> String {
    let c: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    let newlines =
        |s: &[char]| s.iter().filter(|&&ch| ch == '\n').map(|_| '\n').collect::<String>();
    while i < c.len() {
        let rest = &c[i..];
        if rest.starts_with(&['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let (start, mut depth) = (i, 0usize);
            while i < c.len() {
                if c[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    i += 2;
                } else if c[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push_str(&newlines(&c[start..i]));
        } else if c[i] == 'r' && rest.get(1).is_some_and(|&ch| ch == '"' || ch == '#') {
            // A raw string r"…", r#"…"# or br"…", unless `r` ends an identifier or begins a raw
            // identifier like `r#type`.
            let ident_char = |j: usize| c[j].is_alphanumeric() || c[j] == '_';
            let after_ident =
                i > 0 && ident_char(i - 1) && !(c[i - 1] == 'b' && (i < 2 || !ident_char(i - 2)));
            let hashes = rest[1..].iter().take_while(|&&ch| ch == '#').count();
            if after_ident || rest.get(1 + hashes) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let start = i;
            i += 2 + hashes;
            while i < c.len()
                && !(c[i] == '"'
                    && c[i + 1..].iter().take(hashes).filter(|&&ch| ch == '#').count() == hashes)
            {
                i += 1;
            }
            i = (i + 1 + hashes).min(c.len());
            out.push_str("\"\"");
            out.push_str(&newlines(&c[start..i]));
        } else if c[i] == '"' {
            let start = i;
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(c.len());
            out.push_str("\"\"");
            out.push_str(&newlines(&c[start..i.min(c.len())]));
        } else if c[i] == '\'' && rest.get(1) == Some(&'\\') {
            // An escaped char literal: '\n', '\'', '\u{…}'.
            i += 3;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c[i] == '\'' && rest.get(2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            // Anything else, lifetimes included.
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The tokens of stripped code: identifiers, `::`, and single punctuation characters.
fn tokens(code: &str) -> Vec<Token> {
    let c: Vec<char> = code.chars().collect();
    let (mut out, mut i, mut line) = (Vec::new(), 0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Token { text: c[start..i].iter().collect(), line });
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push(Token { text: "::".into(), line });
            i += 2;
        } else {
            out.push(Token { text: ch.to_string(), line });
            i += 1;
        }
    }
    out
}

/// The tokens of `code` without the items marked `#[cfg(test)]` (or `#[cfg(all(test, …))]`):
/// up to the first `;` outside braces or the end of the first braced block.
fn code_tokens(code: &str) -> Vec<Token> {
    let all = tokens(&strip_comments_and_literals(code));
    let text = |i: usize| all.get(i).map_or("", |t| t.text.as_str());
    let mut out = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let test_attr = text(i) == "#"
            && text(i + 1) == "["
            && text(i + 2) == "cfg"
            && text(i + 3) == "("
            && (text(i + 4) == "test" || text(i + 4) == "all" && text(i + 6) == "test");
        if !test_attr {
            out.push(all[i].clone());
            i += 1;
            continue;
        }
        // Skip the attribute, then the item it marks.
        let mut depth = 0usize;
        while i < all.len() {
            match text(i) {
                "[" => depth += 1,
                "]" => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        let mut depth = 0usize;
        while i < all.len() {
            match text(i) {
                "{" => depth += 1,
                "}" => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                ";" if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}

/// A path of a `use` tree or an expression, after the token it starts from: its segments
/// (`self` dropped, `*` kept) and its `as` name.
#[derive(Debug, Clone, PartialEq)]
struct UsePath {
    segments: Vec<String>,
    alias: Option<String>,
    line: usize,
}

fn is_ident(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Expands the tree that follows `toks[at]` (the `::` after a root): `a::b`, `{a, b::{c, d}}`,
/// `*`, with `as` names. Appends to `out` each path as `prefix` + its segments.
fn expand_tree(toks: &[Token], mut at: usize, prefix: &[String], out: &mut Vec<UsePath>) -> usize {
    let text = |i: usize| toks.get(i).map_or("", |t| t.text.as_str());
    let line = toks.get(at).map_or(0, |t| t.line);
    let mut segments = prefix.to_vec();
    loop {
        if text(at) != "::" {
            // The path ends here (`as` or not).
            let alias = (text(at) == "as").then(|| text(at + 1).to_string());
            out.push(UsePath { segments, alias, line });
            return at;
        }
        at += 1;
        match text(at) {
            "{" => {
                at += 1;
                while text(at) != "}" && at < toks.len() {
                    // Each member is a tree of its own, rooted at the current prefix.
                    let mut member = vec![Token { text: "::".into(), line: toks[at].line }];
                    let start = at;
                    let mut depth = 0usize;
                    while at < toks.len() {
                        match text(at) {
                            "{" => depth += 1,
                            "}" if depth == 0 => break,
                            "}" => depth -= 1,
                            "," if depth == 0 => break,
                            _ => {}
                        }
                        at += 1;
                    }
                    member.extend_from_slice(&toks[start..at]);
                    expand_tree(&member, 0, &segments, out);
                    if text(at) == "," {
                        at += 1;
                    }
                }
                return at + 1;
            }
            "*" => {
                segments.push("*".into());
                out.push(UsePath { segments, alias: None, line });
                return at + 1;
            }
            "self" => at += 1,
            t if is_ident(t) => {
                segments.push(t.to_string());
                at += 1;
            }
            // A turbofish or anything else ends the path.
            _ => {
                out.push(UsePath { segments, alias: None, line });
                return at;
            }
        }
    }
}

/// Every path in `toks` that starts with the token `root` (not itself after a `::`).
fn paths_from(toks: &[Token], root: &str) -> Vec<UsePath> {
    let mut out = Vec::new();
    for i in 0..toks.len() {
        if toks[i].text == root && (i == 0 || toks[i - 1].text != "::") {
            expand_tree(toks, i + 1, &[], &mut out);
        }
    }
    out
}

/// The modules a `lib.rs` or `mod.rs` declares, and the names it re-exports with `pub use`,
/// each with the module it comes from.
fn module_index(mod_file: &Path) -> (Vec<String>, BTreeMap<String, String>) {
    let toks = tokens(&strip_comments_and_literals(&std::fs::read_to_string(mod_file).unwrap()));
    let mut modules = Vec::new();
    let mut reexports = BTreeMap::new();
    for i in 0..toks.len() {
        let next = toks.get(i + 1).map_or("", |t| t.text.as_str());
        if toks[i].text == "mod" && is_ident(next) {
            modules.push(next.to_string());
        }
        if toks[i].text == "use" && i > 0 && toks[i - 1].text == "pub" {
            let mut paths = Vec::new();
            // Root the tree at its first segment by treating `use` as a root followed by `::`.
            let mut tree = vec![Token { text: "::".into(), line: toks[i].line }];
            tree.extend(toks[i + 1..].iter().take_while(|t| t.text != ";").cloned());
            expand_tree(&tree, 0, &[], &mut paths);
            for p in paths {
                if let (Some(module), Some(last)) = (p.segments.first(), p.segments.last()) {
                    let name = p.alias.clone().unwrap_or_else(|| last.clone());
                    reexports.insert(name, module.clone());
                }
            }
        }
    }
    (modules, reexports)
}

/// The module of `dir` a name in it refers to: a module itself, or a name re-exported from one.
fn resolve(name: &str, modules: &[String], reexports: &BTreeMap<String, String>) -> Option<String> {
    if modules.iter().any(|m| m == name) {
        Some(name.to_string())
    } else {
        reexports.get(name).cloned()
    }
}

/// The source files of module `m` under `dir`: `m.rs`, or everything in `m/`.
fn module_files(dir: &Path, m: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if dir.join(format!("{m}.rs")).is_file() {
        files.push(dir.join(format!("{m}.rs")));
    }
    rust_files(&dir.join(m), &mut files);
    files
}

/// Which modules of `dir` (a `src/` or a module folder) module `m` uses, reading its paths from
/// `crate::…` (with `crate_prefix` leading to `dir`) and from `super::…` where `super` is `dir`.
fn module_deps(
    dir: &Path,
    m: &str,
    crate_prefix: &[&str],
    modules: &[String],
    reexports: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut deps = Vec::new();
    for file in module_files(dir, m) {
        let toks = code_tokens(&std::fs::read_to_string(&file).unwrap());
        let mut names = Vec::new();
        for p in paths_from(&toks, "crate") {
            if p.segments
                .iter()
                .map(String::as_str)
                .take(crate_prefix.len())
                .eq(crate_prefix.iter().copied())
            {
                names.extend(p.segments.get(crate_prefix.len()).map(|n| (n.clone(), p.line)));
            }
        }
        // `super` names `dir` in `dir/m.rs` and `dir/m/mod.rs` only.
        let super_is_dir = file.parent() == Some(dir)
            || (file.file_name() == Some("mod.rs".as_ref()) && file.parent() == Some(&dir.join(m)));
        if super_is_dir {
            for p in paths_from(&toks, "super") {
                names.extend(p.segments.first().map(|n| (n.clone(), p.line)));
            }
        }
        for (name, line) in names {
            if name == "*" {
                deps.extend(modules.iter().cloned());
            } else if let Some(d) = resolve(&name, modules, reexports) {
                deps.push(d);
            } else if crate_prefix.is_empty() {
                // A crate-root item that is not a module or a re-export (a macro, say).
                continue;
            } else {
                return Err(format!("{}:{line}: cannot tell which module `{name}` is", rel(&file)));
            }
        }
    }
    deps.retain(|d| d != m);
    deps.sort();
    deps.dedup();
    Ok(deps)
}

/// ARCHITECTURE.md: "ltd-nn's `layers` hold only what at least two model crates share". Each
/// module of `ltd_nn::layers` must be used by at least two of [`MODEL_CRATES`], directly
/// (`ltd_nn::layers::…` paths and `use` trees in their `src/`, test code aside) or through
/// another layer that they use.
#[test]
fn ltd_nn_layers_are_shared_by_two_model_crates() {
    let layers = root().join("crates/ltd-nn/src/layers");
    let (modules, reexports) = module_index(&layers.join("mod.rs"));
    assert!(!modules.is_empty(), "no modules found in {}", rel(&layers.join("mod.rs")));
    let mut errors = Vec::new();

    // Direct users.
    let mut users: BTreeMap<String, std::collections::BTreeSet<&str>> =
        modules.iter().map(|m| (m.clone(), Default::default())).collect();
    let mut direct = users.clone();
    for krate in MODEL_CRATES {
        let mut files = Vec::new();
        rust_files(&root().join("crates").join(krate).join("src"), &mut files);
        for file in files {
            let toks = code_tokens(&std::fs::read_to_string(&file).unwrap());
            // The names under which `ltd_nn::layers` itself is in scope (`use ltd_nn::layers;`).
            let mut roots = Vec::new();
            let mut named = Vec::new();
            for p in paths_from(&toks, "ltd_nn") {
                if p.segments.first().map(String::as_str) != Some("layers") {
                    continue;
                }
                match p.segments.get(1) {
                    None => roots.push(p.alias.clone().unwrap_or_else(|| "layers".into())),
                    Some(name) => named.push((name.clone(), p.line)),
                }
            }
            for r in roots {
                named.extend(
                    paths_from(&toks, &r)
                        .into_iter()
                        .filter_map(|p| p.segments.first().map(|n| (n.clone(), p.line))),
                );
            }
            for (name, line) in named {
                if name == "*" {
                    errors.push(format!(
                        "{}:{line}: a glob import from ltd_nn::layers; name the items so that tidy \
                         can tell which layers {krate} uses",
                        rel(&file)
                    ));
                } else if let Some(m) = resolve(&name, &modules, &reexports) {
                    direct.get_mut(&m).unwrap().insert(krate);
                } else {
                    errors.push(format!(
                        "{}:{line}: `ltd_nn::layers::{name}` is neither a module of ltd_nn::layers \
                         nor a name its mod.rs re-exports",
                        rel(&file)
                    ));
                }
            }
        }
    }

    // Users through other layers: a module used by a layer is used by that layer's users.
    let mut deps = BTreeMap::new();
    for m in &modules {
        match module_deps(&layers, m, &["layers"], &modules, &reexports) {
            Ok(d) => {
                deps.insert(m.clone(), d);
            }
            Err(e) => errors.push(e),
        }
    }
    for (m, u) in &direct {
        users.get_mut(m).unwrap().extend(u.iter().copied());
    }
    loop {
        let mut changed = false;
        for (m, ds) in &deps {
            let from = users[m].clone();
            for d in ds {
                let before = users[d].len();
                users.get_mut(d).unwrap().extend(from.iter().copied());
                changed |= users[d].len() != before;
            }
        }
        if !changed {
            break;
        }
    }
    for (m, u) in &users {
        if u.len() < 2 {
            let via: Vec<&String> =
                deps.iter().filter(|(_, ds)| ds.contains(m)).map(|(k, _)| k).collect();
            errors.push(format!(
                "ltd_nn::layers::{m} is used by {} of the model crates ({u:?}; directly: {:?}; \
                 through the layers {via:?}). ARCHITECTURE.md: ltd-nn's layers hold only what at \
                 least two model crates share; move it into the crate that uses it",
                u.len(),
                direct[m]
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// ltd-nn's top-level modules import each other without a circle (errors at the bottom; configs
/// and weights above them; layers above attention and the kernels).
#[test]
fn ltd_nn_modules_form_no_circle() {
    let src = root().join("crates/ltd-nn/src");
    let (modules, reexports) = module_index(&src.join("lib.rs"));
    let mut deps = BTreeMap::new();
    for m in &modules {
        let d = module_deps(&src, m, &[], &modules, &reexports).unwrap_or_else(|e| panic!("{e}"));
        deps.insert(m.clone(), d);
    }
    assert!(
        deps["error"].is_empty(),
        "ltd-nn's error.rs depends on nothing in the crate: {:?}",
        deps["error"]
    );
    // Depth-first search; `path` is the chain of modules being visited.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut Vec<String>,
    ) {
        if done.iter().any(|d| d == m) {
            return;
        }
        if let Some(pos) = path.iter().position(|p| p == m) {
            let mut circle = path[pos..].to_vec();
            circle.push(m.to_string());
            panic!("ltd-nn's modules import each other in a circle: {}", circle.join(" → "));
        }
        path.push(m.to_string());
        for d in &deps[m] {
            visit(d, deps, path, done);
        }
        path.pop();
        done.push(m.to_string());
    }
    let mut done = Vec::new();
    for m in &modules {
        visit(m, &deps, &mut Vec::new(), &mut done);
    }
}

/// Every candle custom op of ltd-nn (a CPU kernel) is in `crates/ltd-nn/src/kernels/`.
#[test]
fn ltd_nn_kernels_live_in_kernels() {
    let src = root().join("crates/ltd-nn/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut hits = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(src.join("kernels"))) {
        let toks = tokens(&strip_comments_and_literals(&std::fs::read_to_string(file).unwrap()));
        for w in toks.windows(2) {
            let op =
                ["CustomOp1", "CustomOp2", "CustomOp3", "InplaceOp1", "InplaceOp2", "InplaceOp3"];
            if op.contains(&w[0].text.as_str()) && w[1].text == "for" {
                hits.push(format!(
                    "{}:{}: impl {} outside kernels/",
                    rel(file),
                    w[0].line,
                    w[0].text
                ));
            }
        }
    }
    assert!(hits.is_empty(), "{}", hits.join("\n"));
}
