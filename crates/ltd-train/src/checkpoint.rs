//! Atomic checkpoints.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding safetensors files (weights,
//! optimiser moments, EMA weights) and `state.json` (step, RNG states, options). It is written
//! under a temporary name, synced, and renamed into place; only then does the one-line file
//! `checkpoints/latest` move (itself written to a temporary file and renamed). A kill at any
//! moment therefore leaves either the previous checkpoint or the new one, never a mixture.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, TrainError};

/// The state file inside a checkpoint folder.
pub const STATE_FILE: &str = "state.json";
/// The pointer file naming the newest complete checkpoint.
pub const LATEST: &str = "latest";

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
    f.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename durable; failure only weakens durability, so it is ignored.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The checkpoints of one training run.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded<T> {
    /// Its folder.
    pub path: PathBuf,
    /// The state it recorded.
    pub state: T,
}

impl<T> Loaded<T> {
    /// Loads `NAME.safetensors` from the checkpoint onto `device`.
    pub fn tensors(&self, name: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.path.join(format!("{name}.safetensors"));
        candle_core::safetensors::load(&path, device)
            .map_err(|e| TrainError::checkpoint(&self.path, format!("{name}.safetensors: {e}")))
    }
}

impl Checkpoints {
    /// The checkpoints under `dir` (created on the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves a checkpoint for `step` with the named tensor files and the state, then keeps
    /// only the newest `keep` checkpoints (at least one). Returns the checkpoint's folder.
    pub fn save<T: Serialize>(
        &self,
        step: usize,
        files: &[(&str, &HashMap<String, Tensor>)],
        state: &T,
        keep: usize,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        let name = format!("step-{step:08}");
        let fin = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        for (file, tensors) in files {
            let path = tmp.join(format!("{file}.safetensors"));
            candle_core::safetensors::save(tensors, &path)?;
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| TrainError::io(&path, e))?;
        }
        let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::msg(e.to_string()))?;
        write_atomic(&tmp.join(STATE_FILE), &json)?;
        if fin.exists() {
            // A checkpoint of this step from an earlier, interrupted attempt: replace it.
            std::fs::remove_dir_all(&fin).map_err(|e| TrainError::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| TrainError::io(&fin, e))?;
        sync_dir(&self.dir);
        write_atomic(&self.dir.join(LATEST), name.as_bytes())?;
        self.prune(keep.max(1), &name)?;
        Ok(fin)
    }

    /// Removes all but the newest `keep` checkpoints, never `current`, and stale temporaries.
    fn prune(&self, keep: usize, current: &str) -> Result<()> {
        let mut steps = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") {
                let _ = std::fs::remove_dir_all(entry.path());
            } else if name.starts_with("step-") && name != current {
                steps.push(name);
            }
        }
        steps.sort();
        let excess = (steps.len() + 1).saturating_sub(keep);
        for name in steps.iter().take(excess) {
            let path = self.dir.join(name);
            std::fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
        }
        Ok(())
    }

    /// The newest complete checkpoint, or `None` when there is none.
    pub fn latest<T: DeserializeOwned>(&self) -> Result<Option<Loaded<T>>> {
        let pointer = self.dir.join(LATEST);
        let name = match std::fs::read_to_string(&pointer) {
            Ok(n) => n.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TrainError::io(&pointer, e)),
        };
        let path = self.dir.join(&name);
        let state_path = path.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state = serde_json::from_str(&text)
            .map_err(|e| TrainError::checkpoint(&path, format!("{STATE_FILE}: {e}")))?;
        Ok(Some(Loaded { path, state }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_prunes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path().join("checkpoints"));
        assert!(ck.latest::<usize>().unwrap().is_none());
        let t: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())].into();
        for step in [5usize, 10, 15] {
            ck.save(step, &[("model", &t)], &step, 2).unwrap();
        }
        let loaded = ck.latest::<usize>().unwrap().unwrap();
        assert_eq!(loaded.state, 15);
        assert!(loaded.path.ends_with("step-00000015"));
        let w = &loaded.tensors("model", &Device::Cpu).unwrap()["w"];
        assert_eq!(w.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        let mut names: Vec<String> = std::fs::read_dir(ck.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["latest", "step-00000010", "step-00000015"]);
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
