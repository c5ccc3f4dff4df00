//! `cargo xtask fixtures [SECTION...]`: regenerates the reference fixtures with the pinned
//! Python stack (tests/fixtures/requirements.txt) in a private virtual environment.
//!
//! The environment lives in `target/fixtures-venv` (or `$LTD_FIXTURES_VENV`) and is rebuilt
//! when requirements.txt changes. It needs Python ≥ 3.10 and PyPI; nothing else touches the
//! network, and tests never need it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Arguments of `cargo xtask fixtures`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sections to regenerate (default: all). See tests/fixtures/generate.py.
    pub sections: Vec<String>,
    /// The Python interpreter used to create the environment.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// Runs the task.
pub fn run(args: &Args, root: &Path) -> Result<()> {
    let fixtures = root.join("tests/fixtures");
    let requirements = fixtures.join("requirements.txt");
    let venv = std::env::var_os("LTD_FIXTURES_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/fixtures-venv"));
    let python = venv.join("bin/python");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    if !python.exists() || current != wanted {
        eprintln!(
            "creating the reference environment in {} (about 6 GB, a few minutes)",
            venv.display()
        );
        status(Command::new(&args.python).args(["-m", "venv"]).arg(&venv))?;
        status(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "-r"])
                .arg(&requirements),
        )?;
        std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    }
    status(Command::new(&python).arg(fixtures.join("generate.py")).args(&args.sections))
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}
