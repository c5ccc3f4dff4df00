//! What the server's integration tests share: a real `ltd-serve` process on a free port, a
//! JSON client, and `ltd-gen` (built on demand) to compare images with.

#![allow(dead_code)] // each test target uses a part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

/// The tiny SD 1.x fixture pipeline.
pub fn sd1() -> PathBuf {
    ltd_test_support::fixtures().join("pipelines/sd1")
}

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its log lines so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `ltd-serve` with `args` on a free port and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let cache = std::env::temp_dir().join("ltd-serve-tests-cache");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ltd-serve"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("LTD_CACHE", &cache)
            .env_remove("LTD_API_KEY")
            .env("RUST_LOG", "ltd_serve=info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("ltd-serve starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("ltd-serve did not start:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        Self { child, url, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (at most `secs`); its exit status if it did.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// POSTs JSON; (status, body as JSON or as `{"text": …}`).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send_raw(path, "application/json", body.to_string().into_bytes(), None)
    }

    /// POSTs raw bytes with a content type and an optional `Authorization` header.
    pub fn send_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        auth: Option<&str>,
    ) -> (u16, Value) {
        let mut req =
            agent().post(format!("{}{path}", self.url)).header("Content-Type", content_type);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        answer(req.send(&body[..]))
    }

    /// GETs a path.
    pub fn get(&self, path: &str) -> (u16, Value) {
        answer(agent().get(format!("{}{path}", self.url)).call())
    }

    /// GETs a path; the raw body.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let res = agent().get(format!("{}{path}", self.url)).call().expect("server answers");
        let status = res.status().as_u16();
        (status, res.into_body().read_to_string().unwrap_or_default())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

fn answer(res: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let res = res.expect("server answers");
    let status = res.status().as_u16();
    let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = res.into_body().with_config().limit(1 << 30).read_to_string().unwrap_or_default();
    let mut v: Value = serde_json::from_str(&text).unwrap_or(serde_json::json!({ "text": text }));
    if let (Some(r), Value::Object(m)) = (retry, &mut v) {
        m.insert("__retry_after".into(), Value::String(r));
    }
    (status, v)
}

/// Decodes a base64 string.
pub fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// Encodes bytes as base64.
pub fn to_b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The `ltd-gen` binary beside `ltd-serve` in the target folder, built first if needed (a
/// no-op when `cargo test --workspace` built it).
pub fn ltd_gen() -> PathBuf {
    let serve = Path::new(env!("CARGO_BIN_EXE_ltd-serve"));
    let gen = serve.with_file_name(format!("ltd-gen{}", std::env::consts::EXE_SUFFIX));
    let release = serve.parent().is_some_and(|d| d.ends_with("release"));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", "ltd-cli", "--bin", "ltd-gen"]);
    if release {
        cmd.arg("--release");
    }
    let target_dir = serve.parent().and_then(Path::parent).expect("target/<profile>/ltd-serve");
    let status = cmd
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building ltd-gen failed");
    gen
}

/// Runs `ltd-gen` with `args`, writing into `dir`; the PNG bytes of each image written.
pub fn run_ltd_gen(dir: &Path, args: &[&str], count: usize) -> Vec<Vec<u8>> {
    let out = dir.join("gen.png");
    let status = Command::new(ltd_gen())
        .args(args)
        .arg("--quiet")
        .arg("-o")
        .arg(&out)
        .env("LTD_CACHE", std::env::temp_dir().join("ltd-serve-tests-cache"))
        .status()
        .expect("ltd-gen runs");
    assert!(status.success(), "ltd-gen {args:?} failed");
    if count == 1 {
        vec![std::fs::read(&out).unwrap()]
    } else {
        (1..=count).map(|i| std::fs::read(dir.join(format!("gen-{i}.png"))).unwrap()).collect()
    }
}
