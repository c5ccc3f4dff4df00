//! `cargo xtask build-cuda [--flash-attn]`: builds the CUDA `ltd-gen` for an H100 on a machine
//! with no GPU and no CUDA install, and packs `.gpu/` for `xtask/gpu/check.sh` on the GPU
//! machine. The work is `xtask/gpu/build-cuda.sh` (nvcc and the CUDA libraries from PyPI, a
//! stub `libcuda` to link against; its header says why each step is needed): a shell script so
//! that it can also run where no xtask is built.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Arguments of `cargo xtask build-cuda`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also compile candle-flash-attn's kernels (`--features cuda,flash-attn`; much longer) and
    /// write `.gpu/ltd-gen-flash.xz`.
    #[arg(long)]
    flash_attn: bool,
    /// Skip downloading the diffusers wheels that `xtask/gpu/check.sh` compares against.
    #[arg(long)]
    no_reference: bool,
}

/// The script's arguments for these flags.
fn script_args(args: &Args) -> Vec<&'static str> {
    let mut out = Vec::new();
    if args.flash_attn {
        out.push("--flash-attn");
    }
    if args.no_reference {
        out.push("--no-reference");
    }
    out
}

pub fn run(args: &Args, root: &Path) -> Result<()> {
    let script = root.join("xtask/gpu/build-cuda.sh");
    let status = Command::new("bash")
        .arg(&script)
        .args(script_args(args))
        .current_dir(root)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("build-cuda: {} failed ({status})", script.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_reach_the_script() {
        let args = |flash_attn, no_reference| Args { flash_attn, no_reference };
        assert!(script_args(&args(false, false)).is_empty());
        assert_eq!(script_args(&args(true, true)), ["--flash-attn", "--no-reference"]);
    }
}
