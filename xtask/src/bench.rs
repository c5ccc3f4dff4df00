//! `cargo xtask bench`: CPU speed and memory of ltd against diffusers/PyTorch, measured in the
//! same run on the same machine.
//!
//! Items (`--only`, default all):
//! - `matmul`: a 4096³ f32 matrix product, candle's and torch's: the machine's calibration;
//! - `unet`: one SD 1.5 U-Net step (configs/stable-diffusion-v1-5/unet, random weights,
//!   512×512 so 64×64 latents, batch 2 as for classifier-free guidance, text states
//!   `[2, 77, 768]`), after `--warmup` untimed steps: median over `--steps` steps;
//! - `vae`: an SD 1.5 VAE decode to 512×512, batch 1, likewise;
//! - `small`: one step of a tiny SD 1.x U-Net (`xtask/bench/small-sd`: 32/64 channels, 8 heads
//!   of dimension 4, 32×32 latents of a 64×64 image, batch 2), where per-operation overheads
//!   and attention over many tokens with small heads show (`bench/small.rs`);
//! - `load`: loading a random SD 1.5 U-Net checkpoint (3.4 GB, written once to
//!   `target/bench/sd15-unet/`) with `UNet2DConditionModel::load` and with diffusers'
//!   `from_pretrained`: peak memory against the file's size;
//! - `serve`: requests/s and latency of the default model through `ltd-serve` against
//!   `ltd-gen` run once per image (`bench/serve.rs`; its own table, no diffusers side).
//! - `single-file`: loading a full-size SD 1.5 single-file checkpoint (zero-filled f16, of the
//!   real original-layout key list) with `Pipeline::load`, against the same weights as a
//!   diffusers folder: load time and peak memory, ltd only (see `bench/single_file.rs`).
//! - `train-unet`, `train-vae`: one training step (forward, backward, clipping, AdamW) of the
//!   shipped shapes recipes against PyTorch with diffusers' classes (see `bench/train.rs`).
//!
//! Every item runs in a child process of its own (this binary with the hidden `--child` flag,
//! and `xtask/bench/reference.py` for the reference), so each peak resident set belongs to one
//! item alone; it is reset (`/proc/self/clear_refs`) once the model is built, so it covers the
//! weights and the computation, not construction. CPU-seconds (user + system, all threads) are
//! reported next to wall time: on a machine shared with other work they are the steadier
//! measure of how much computing each side needs.
//!
//! The reference runs in the pinned Python environment, the first that exists of
//! `$LTD_FIXTURES_VENV/bin/python`, `target/fixtures-venv/bin/python` (what `cargo xtask
//! fixtures` creates) and `/root/venvs/ref/bin/python`; without one (or with
//! `--no-reference`) only ltd is measured, and the table says so.

mod measure;
mod serve;
mod single_file;
mod small;
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Operations of one SD 1.5 U-Net step at 512×512, batch 2 (multiply-adds counted twice), as
/// `torch.utils.flop_counter.FlopCounterMode` counts them for diffusers' model.
const UNET_GFLOP: f64 = 1606.0;
/// Operations of one SD 1.5 VAE decode at 512×512, batch 1, counted the same way.
const VAE_GFLOP: f64 = 2515.0;
/// Side of the calibration matrix product.
const MATMUL_N: usize = 4096;

/// A benchmark item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Item {
    /// A 4096³ f32 matrix product.
    Matmul,
    /// One SD 1.5 U-Net step at 512×512, batch 2.
    Unet,
    /// One SD 1.5 VAE decode at 512×512.
    Vae,
    /// Loading a 3.4 GB SD 1.5 U-Net checkpoint.
    Load,
    /// The default model through ltd-serve against ltd-gen per process.
    Serve,
    /// Loading a full-size SD 1.5 single-file checkpoint, against the same as a folder.
    SingleFile,
    /// One step of a tiny SD 1.x U-Net on 32×32 latents, batch 2.
    Small,
    /// One `train-unet` step of the shapes recipe, against PyTorch.
    TrainUnet,
    /// One `train-vae` step of the shapes recipe, against PyTorch.
    TrainVae,
}

impl Item {
    const ALL: [Item; 9] = [
        Item::Matmul,
        Item::Unet,
        Item::Vae,
        Item::Load,
        Item::Serve,
        Item::SingleFile,
        Item::Small,
        Item::TrainUnet,
        Item::TrainVae,
    ];

    fn name(self) -> &'static str {
        match self {
            Item::Matmul => "matmul",
            Item::Unet => "unet",
            Item::Vae => "vae",
            Item::Load => "load",
            Item::Serve => "serve",
            Item::SingleFile => "single-file",
            Item::Small => "small",
            Item::TrainUnet => "train-unet",
            Item::TrainVae => "train-vae",
        }
    }

    /// Operations of one run, in GFLOP.
    fn gflop(self) -> Option<f64> {
        match self {
            Item::Matmul => Some(2.0 * (MATMUL_N as f64).powi(3) / 1e9),
            Item::Unet => Some(UNET_GFLOP),
            Item::Vae => Some(VAE_GFLOP),
            Item::Small => Some(small::GFLOP),
            Item::Load | Item::Serve | Item::SingleFile | Item::TrainUnet | Item::TrainVae => None,
        }
    }
}

/// What a child process does (hidden from `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Child {
    Matmul,
    Unet,
    Vae,
    Load,
    /// Writes the random checkpoint the `load` item reads.
    WriteUnet,
    /// Loads the `single-file` item's checkpoint.
    LoadSingleFile,
    /// Loads the `single-file` item's diffusers folder.
    LoadFolder,
    Small,
    /// A `train-unet` step.
    TrainUnet,
    /// A `train-vae` step.
    TrainVae,
}

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Items to run, comma-separated or repeated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Item>,
    /// Timed runs per item (U-Net steps, VAE decodes, products); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed runs before them.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Precision of the `unet`, `vae` and `small` items, the same on both sides: weights and
    /// inputs in it (`bf16`: diffusers' model `.to(torch.bfloat16)`; ltd's `--dtype bf16`,
    /// whose CPU kernels compute in f32 and round to bf16 after each layer, as PyTorch's do).
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    pub dtype: BenchDtype,
    /// The `unet` and `small` items on ltd's side with the U-Net's transformer linear layers
    /// quantized (`ltd-gen --quantize`: `q8_0`); diffusers' side stays in `--dtype`, as
    /// diffusers has no such format.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<ltd_nn::Quantization>,
    /// Measure ltd only.
    #[arg(long)]
    pub no_reference: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run one item in this process and print its measurement as JSON (used by the bench).
    #[arg(long, value_enum, hide = true)]
    pub child: Option<Child>,
    /// The folder of the `single-file` item's files (passed to its children).
    #[arg(long, hide = true)]
    pub bench_dir: Option<PathBuf>,
}

/// The precision `--dtype` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchDtype {
    F32,
    Bf16,
}

impl BenchDtype {
    fn name(self) -> &'static str {
        match self {
            BenchDtype::F32 => "f32",
            BenchDtype::Bf16 => "bf16",
        }
    }

    /// candle's dtype.
    pub fn candle(self) -> candle_core::DType {
        match self {
            BenchDtype::F32 => candle_core::DType::F32,
            BenchDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// One side's measurement of one item (the reference script prints the same fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub item: String,
    pub implementation: String,
    /// Wall seconds of each timed run.
    pub wall_s: Vec<f64>,
    /// CPU seconds (user + system, all threads) of each timed run.
    pub cpu_s: Vec<f64>,
    pub median_wall_s: f64,
    pub median_cpu_s: f64,
    /// Resident set once the model was built (the weights), MiB.
    pub base_rss_mib: Option<f64>,
    /// Peak resident set from then on, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Compute threads.
    pub threads: usize,
    /// Item-specific details (file size, versions, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// The machine the bench ran on.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    avx2: bool,
    fma: bool,
    avx512f: bool,
    memory_gib: f64,
    load_average_start: String,
    load_average_end: String,
}

impl Machine {
    fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        Self {
            cpu: field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            avx2: has("avx2"),
            fma: has("fma"),
            avx512f: has("avx512f"),
            memory_gib: mem_kib / (1024.0 * 1024.0),
            load_average_start: load_average(),
            load_average_end: String::new(),
        }
    }

    fn describe(&self) -> String {
        let flag = |on: bool, name: &str| if on { name.to_string() } else { format!("no {name}") };
        format!(
            "{}, {} cores ({}, {}, {}), {:.0} GiB; load average at start {}, at end {}",
            self.cpu,
            self.cores,
            flag(self.avx2, "AVX2"),
            flag(self.fma, "FMA"),
            flag(self.avx512f, "AVX-512F"),
            self.memory_gib,
            self.load_average_start,
            self.load_average_end
        )
    }
}

fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Both sides of one item.
#[derive(Debug, Serialize)]
struct Row {
    item: Item,
    gflop: Option<f64>,
    ltd: Measurement,
    diffusers: Option<Measurement>,
    /// Why there is no reference measurement.
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_error: Option<String>,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    steps: usize,
    warmup: usize,
    dtype: BenchDtype,
    quantize: Option<&'static str>,
    reference_python: Option<PathBuf>,
    rows: Vec<Row>,
}

/// The folder of the `load` item's random checkpoint.
fn load_dir(root: &Path) -> PathBuf {
    root.join("target/bench/sd15-unet")
}

/// The Python of the pinned reference environment (see the module documentation).
fn reference_python(root: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(venv) = std::env::var_os("LTD_FIXTURES_VENV").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(venv).join("bin/python"));
    }
    candidates.push(root.join("target/fixtures-venv/bin/python"));
    candidates.push(PathBuf::from("/root/venvs/ref/bin/python"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs the task.
pub fn run(args: &Args, root: &Path) -> Result<()> {
    if let Some(child) = args.child {
        return measure::run_child(child, args, root);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let items: Vec<Item> =
        Item::ALL.into_iter().filter(|i| args.only.is_empty() || args.only.contains(i)).collect();
    if let Some(q) = args.quantize {
        if let Some(item) = items.iter().find(|i| !matches!(i, Item::Unet | Item::Small)) {
            bail!(
                "--quantize {q} applies to the unet and small items only, not {} \
                 (pick them with --only)",
                item.name()
            );
        }
    }
    if args.dtype != BenchDtype::F32 {
        if let Some(item) =
            items.iter().find(|i| !matches!(i, Item::Unet | Item::Vae | Item::Small))
        {
            bail!(
                "--dtype {} applies to the unet, vae and small items only, not {} \
                 (pick them with --only)",
                args.dtype.name(),
                item.name()
            );
        }
    }
    let mut machine = Machine::detect();
    let python = if args.no_reference { None } else { reference_python(root) };
    match &python {
        Some(p) => eprintln!("reference: diffusers/PyTorch with {}", p.display()),
        None if args.no_reference => eprintln!("reference: skipped (--no-reference)"),
        None => eprintln!(
            "reference: no Python environment found ($LTD_FIXTURES_VENV, \
             target/fixtures-venv, /root/venvs/ref); measuring ltd only"
        ),
    }

    let mut rows = Vec::new();
    for item in items {
        if item == Item::Serve {
            serve::run(root, args.steps)?;
            continue;
        }
        if item == Item::SingleFile {
            let ltd = single_file_item(args, root)?;
            rows.push(Row { item, gflop: None, ltd, diffusers: None, reference_error: None });
            continue;
        }
        if item == Item::Load {
            ensure_checkpoint(args, root)?;
        }
        eprintln!("{}: ltd …", item.name());
        let ltd = run_ours(item, args)?;
        let (diffusers, reference_error) = match &python {
            Some(py) => {
                eprintln!("{}: diffusers …", item.name());
                match run_reference(py, item, args, root) {
                    Ok(m) => (Some(m), None),
                    Err(e) => {
                        eprintln!("{}: the reference failed: {e:#}", item.name());
                        (None, Some(format!("{e:#}")))
                    }
                }
            }
            None => (None, None),
        };
        rows.push(Row { item, gflop: item.gflop(), ltd, diffusers, reference_error });
    }
    machine.load_average_end = load_average();

    if !rows.is_empty() {
        print!("{}", table(&rows, python.is_some()));
    }
    println!("machine: {}", machine.describe());
    println!(
        "median of {} timed run(s) after {} warm-up run(s); {}{}; ratio = ltd / diffusers \
         (times, memory: below 1 is better for ltd; GFLOP/s: above 1)",
        args.steps,
        args.warmup,
        args.dtype.name(),
        args.quantize.map_or(String::new(), |q| format!(", ltd's transformer layers in {q}"))
    );
    if let Some(path) = &args.json {
        let report = Report {
            machine,
            steps: args.steps,
            warmup: args.warmup,
            dtype: args.dtype,
            quantize: args.quantize.map(|q| q.name()),
            reference_python: python,
            rows,
        };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn child_args(args: &Args) -> Vec<String> {
    let mut out: Vec<String> =
        vec!["--steps".into(), args.steps.to_string(), "--warmup".into(), args.warmup.to_string()];
    if args.dtype != BenchDtype::F32 {
        out.extend(["--dtype".into(), args.dtype.name().into()]);
    }
    out
}

/// Runs `cmd`, passing its stderr through, and parses the last line of its stdout as JSON.
fn run_json(mut cmd: Command) -> Result<Measurement> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("parsing the result of {cmd:?}: {last:?}"))
}

fn run_ours(item: Item, args: &Args) -> Result<Measurement> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--child", item.name()]).args(child_args(args));
    if let Some(q) = args.quantize {
        cmd.args(["--quantize", q.name()]);
    }
    run_json(cmd)
}

fn run_reference(python: &Path, item: Item, args: &Args, root: &Path) -> Result<Measurement> {
    // The same thread count as our side (candle's, which honours RAYON_NUM_THREADS).
    let cores = candle_core::utils::get_num_threads();
    let mut cmd = Command::new(python);
    cmd.arg(root.join("xtask/bench/reference.py"))
        .arg(item.name())
        .args(child_args(args))
        .args(["--threads", &cores.to_string()]);
    match item {
        Item::Unet => cmd.arg("--config").arg(root.join(measure::UNET_CONFIG)),
        Item::Vae => cmd.arg("--config").arg(root.join(measure::VAE_CONFIG)),
        Item::Small => cmd.arg("--config").arg(root.join(small::CONFIG)),
        Item::Load => cmd.arg("--model-dir").arg(load_dir(root)),
        Item::TrainUnet => cmd.arg("--config").arg(root.join(train::UNET_CONFIG)),
        Item::TrainVae => cmd.arg("--config").arg(root.join(train::VAE_CONFIG)),
        Item::Matmul | Item::Serve | Item::SingleFile => &mut cmd,
    };
    run_json(cmd)
}

/// The `single-file` item: writes the files, loads each in a child, removes them; the single
/// file's measurement with the folder's beside it.
fn single_file_item(args: &Args, root: &Path) -> Result<Measurement> {
    let dir = single_file::bench_dir();
    eprintln!(
        "single-file: writing a zero-filled SD 1.5 checkpoint and folder to {}",
        dir.display()
    );
    let written = single_file::write_files(root, &dir);
    let load = |child: &str| -> Result<Measurement> {
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "--child", child]).args(child_args(args)).arg("--bench-dir").arg(&dir);
        run_json(cmd)
    };
    let result = written.and_then(|(file, folder)| {
        eprintln!("single-file: ltd, the checkpoint …");
        let mut single = load("load-single-file")?;
        eprintln!("single-file: ltd, the diffusers folder …");
        let folder_m = load("load-folder")?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        single.extra.insert("file_mib".into(), mib(file).into());
        single.extra.insert("folder_mib".into(), mib(folder).into());
        single.extra.insert("folder_wall_s".into(), folder_m.median_wall_s.into());
        single.extra.insert("folder_cpu_s".into(), folder_m.median_cpu_s.into());
        single.extra.insert("folder_peak_rss_mib".into(), folder_m.peak_rss_mib.into());
        Ok(single)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Writes the random checkpoint of the `load` item unless a complete one is there.
fn ensure_checkpoint(args: &Args, root: &Path) -> Result<()> {
    if load_dir(root).join(measure::COMPLETE_MARKER).is_file() {
        return Ok(());
    }
    eprintln!("load: writing a random SD 1.5 U-Net checkpoint to {}", load_dir(root).display());
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--child", "write-unet"]).args(child_args(args));
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("writing the checkpoint failed with {status}");
    }
    Ok(())
}

/// One line of the table: what is measured, and how to read it from a measurement.
type Line<'a> = (String, Box<dyn Fn(&Measurement) -> Option<f64> + 'a>, usize);

/// The lines of one item.
fn lines_of(row: &Row) -> Vec<Line<'_>> {
    let mut lines: Vec<Line<'_>> = Vec::new();
    let unit = match row.item {
        Item::Unet | Item::Small | Item::TrainUnet | Item::TrainVae => "s/step",
        _ => "s",
    };
    if row.item != Item::Matmul {
        lines.push((format!("{unit} (wall)"), Box::new(|m| Some(m.median_wall_s)), 2));
        lines.push((format!("CPU-{unit}"), Box::new(|m| Some(m.median_cpu_s)), 2));
    }
    if let Some(g) = row.gflop {
        lines.push(("GFLOP/s (wall)".into(), Box::new(move |m| Some(g / m.median_wall_s)), 1));
        lines.push(("GFLOP per CPU-s".into(), Box::new(move |m| Some(g / m.median_cpu_s)), 1));
    }
    lines.push(("peak RSS MiB".into(), Box::new(|m| m.peak_rss_mib), 0));
    match row.item {
        Item::Unet | Item::Vae | Item::Small | Item::TrainUnet | Item::TrainVae => {
            let above = |m: &Measurement| m.peak_rss_mib.zip(m.base_rss_mib).map(|(p, b)| p - b);
            lines.push(("peak above weights MiB".into(), Box::new(above), 0));
        }
        Item::Load => {
            // Both sides read the same file, whose size ltd's side reports.
            let file_mib = row.ltd.extra.get("file_mib").and_then(Value::as_f64);
            lines.push(("file MiB".into(), Box::new(move |_| file_mib), 0));
            let per_file = move |m: &Measurement| m.peak_rss_mib.zip(file_mib).map(|(p, f)| p / f);
            lines.push(("peak RSS / file size".into(), Box::new(per_file), 2));
        }
        Item::SingleFile => {
            let get =
                |key: &'static str| move |m: &Measurement| m.extra.get(key).and_then(Value::as_f64);
            lines.push(("file MiB".into(), Box::new(get("file_mib")), 0));
            lines.push(("as a folder: s (wall)".into(), Box::new(get("folder_wall_s")), 2));
            lines.push(("as a folder: CPU-s".into(), Box::new(get("folder_cpu_s")), 2));
            lines.push((
                "as a folder: peak RSS MiB".into(),
                Box::new(get("folder_peak_rss_mib")),
                0,
            ));
        }
        Item::Matmul | Item::Serve => {}
    }
    lines
}

/// The results as a text table.
fn table(rows: &[Row], with_reference: bool) -> String {
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let mut cells: Vec<[String; 5]> =
        vec![["item", "measure", "ltd", "diffusers", "ratio"].map(String::from)];
    for row in rows {
        for (i, (what, value, digits)) in lines_of(row).into_iter().enumerate() {
            let (x, y) = (value(&row.ltd), row.diffusers.as_ref().and_then(value));
            let name = if i == 0 { row.item.name() } else { "" };
            let ratio = fmt(x.zip(y).map(|(x, y)| x / y), 2);
            cells.push([name.into(), what, fmt(x, digits), fmt(y, digits), ratio]);
        }
        if let Some(err) = &row.reference_error {
            cells.push([
                "".into(),
                format!("(reference failed: {err})"),
                "".into(),
                "".into(),
                "".into(),
            ]);
        }
    }
    let widths: Vec<usize> =
        (0..5).map(|c| cells.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for line in &cells {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (s, &w))| if c < 2 { format!("{s:<w$}") } else { format!("{s:>w$}") })
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    if !with_reference {
        out.push_str("(no reference measured: the diffusers column is empty)\n");
    }
    out
}
