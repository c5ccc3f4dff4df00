//! The `serve` item: what keeping the model loaded saves. The default model's txt2img at its
//! own size, timed end to end as a user sees it: `ltd-gen` as one process per image (start,
//! model load, generation, PNG), against `ltd-serve` answering HTTP requests (one client
//! after another, then several clients at once, which its queue serialises). Both binaries
//! are built first, in xtask's profile; the server listens on a free localhost port.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// Steps of each image (the default model's own sampler).
const STEPS: usize = 20;
/// Clients at once in the concurrent run.
const CLIENTS: usize = 4;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Builds `ltd-gen` and `ltd-serve` in xtask's own profile (release, unless xtask runs
/// unoptimised under `LTD_XTASK_NO_RELEASE`); their paths.
fn build(root: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = !cfg!(debug_assertions);
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "ltd-cli", "-p", "ltd-serve", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.current_dir(root).status().context("running cargo build")?;
    if !status.success() {
        bail!("building ltd-gen and ltd-serve failed");
    }
    let dir = root.join(if release { "target/release" } else { "target/debug" });
    Ok((dir.join("ltd-gen"), dir.join("ltd-serve")))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server; its URL once it listens.
fn start_server(exe: &Path) -> Result<(Server, String)> {
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0", "--queue", "64"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stderr = child.stderr.take().context("the server's stderr")?;
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    while let Some(line) = lines.next() {
        if let Some(url) = line?.split("listening on ").nth(1) {
            let url = url.trim().to_string();
            // Keep reading its log so that it never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((server, url));
        }
    }
    bail!("ltd-serve exited before listening")
}

fn request(agent: &ureq::Agent, url: &str, seed: usize) -> Result<f64> {
    let start = Instant::now();
    let body = json!({"prompt": "a red circle on a blue background", "seed": seed, "steps": STEPS});
    let mut res = agent
        .post(format!("{url}/sdapi/v1/txt2img"))
        .header("Content-Type", "application/json")
        .send(body.to_string())?;
    let text = res.body_mut().with_config().limit(1 << 30).read_to_string()?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if v["images"].as_array().map_or(0, Vec::len) != 1 {
        bail!("the server gave no image: {v}");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs the item and prints its table.
pub fn run(root: &Path, runs: usize) -> Result<()> {
    let runs = runs.max(3);
    let (gen, serve) = build(root)?;
    let tmp = std::env::temp_dir().join(format!("ltd-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;

    eprintln!("serve: ltd-gen, one process per image …");
    let mut per_process = Vec::new();
    for k in 0..=runs {
        let start = Instant::now();
        let status = Command::new(&gen)
            .args(["a red circle on a blue background", "--quiet", "--steps", &STEPS.to_string()])
            .args(["--seed", &k.to_string(), "-o"])
            .arg(tmp.join("gen.png"))
            .status()?;
        if !status.success() {
            bail!("ltd-gen failed");
        }
        // The first run extracts the embedded model to the cache: warm-up.
        if k > 0 {
            per_process.push(start.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);

    eprintln!("serve: ltd-serve …");
    let start = Instant::now();
    let (_server, url) = start_server(&serve)?;
    let startup = start.elapsed().as_secs_f64();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(600))).build().into();
    request(&agent, &url, 0)?;
    let sequential: Vec<f64> =
        (1..=runs).map(|k| request(&agent, &url, k)).collect::<Result<_>>()?;
    let total = runs * CLIENTS;
    let start = Instant::now();
    let concurrent: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (agent, url) = (&agent, &url);
                s.spawn(move || -> Result<Vec<f64>> {
                    (0..runs).map(|k| request(agent, url, 1000 + c * runs + k)).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect::<Result<Vec<_>>>()
    })?
    .concat();
    let concurrent_wall = start.elapsed().as_secs_f64();

    let gen_latency = median(&per_process);
    let seq_latency = median(&sequential);
    println!("serve: default model, txt2img at its size, {STEPS} steps, {runs} runs (median)");
    println!(
        "  ltd-gen, one process per image:  {gen_latency:.3} s/image, {:.2} images/s",
        1.0 / gen_latency
    );
    println!(
        "  ltd-serve, one client:           {seq_latency:.3} s/request, {:.2} requests/s",
        1.0 / seq_latency
    );
    println!(
        "  ltd-serve, {CLIENTS} clients at once:     {:.3} s/request latency, {:.2} requests/s",
        median(&concurrent),
        total as f64 / concurrent_wall
    );
    println!("  ltd-serve start (model load):    {startup:.3} s, once");
    println!("  saving per image: {:.1}x", gen_latency / seq_latency);
    Ok(())
}
