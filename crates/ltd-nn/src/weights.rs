//! Memory-mapped safetensors and a checking `VarBuilder` backend.
//!
//! Weights are read from memory-mapped files, one tensor at a time: each tensor is converted
//! straight from the mapping into its device buffer (the one copy candle needs, since its
//! tensors own their storage), and the mapped pages are released at once, so peak memory stays
//! near the size of the model rather than twice it.
//!
//! Loading reports completeness: every requested tensor is checked against the files, and
//! the missing, mis-shaped and unusable ones are reported together with the file, instead of
//! stopping at the first. Model constructors only fetch tensors (they never compute on them),
//! which lets [`record_shapes`] build even a full-size SDXL U-Net out of zero-stride
//! placeholders to list the names and shapes it asks for.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;

use crate::config::read_json;
use crate::error::{Error, LoadReport, Mismatch, Result};
use crate::patch::WeightPatches;

/// File extensions of pickle-based checkpoints, which we refuse to open.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth", "pkl", "pickle"];

/// Where a tensor lives inside a mapped file.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the mapping (header already skipped).
    start: usize,
    end: usize,
    /// The stored matrix is the transpose of `shape` (a renamed view's `Alias::transpose`).
    transpose: bool,
}

/// Where a tensor of a renamed view ([`SafetensorsFiles::view`]) comes from: a stored tensor,
/// or rows of one, seen under another name and shape without copying anything at open time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// The stored tensor's name.
    pub source: String,
    /// Rows `start..end` of the stored tensor's first axis (one of a fused q/k/v projection);
    /// `None` for all of it.
    pub rows: Option<(usize, usize)>,
    /// The shape the view presents: the stored shape (after `rows`) reshaped, e.g. a 1×1
    /// convolution `[o, i, 1, 1]` seen as the linear layer `[o, i]`.
    pub shape: Vec<usize>,
    /// The stored 2-D tensor is the transpose of the one presented (open_clip keeps its text
    /// projection as `x @ W`, transformers as `W x`): one small copy when loaded.
    pub transpose: bool,
}

/// One or more memory-mapped safetensors files seen as one set of named tensors.
pub struct SafetensorsFiles {
    paths: Vec<PathBuf>,
    mmaps: Vec<Mmap>,
    entries: HashMap<String, TensorEntry>,
    /// Deltas added to tensors as they load (LoRA).
    patches: Option<Arc<WeightPatches>>,
}

impl fmt::Debug for SafetensorsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFiles")
            .field("paths", &self.paths)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// Refuses pickle checkpoints by extension, with an explanation.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(Error::Pickle { path: path.to_path_buf() });
    }
    Ok(())
}

impl SafetensorsFiles {
    /// Maps the files and reads their headers. Truncated or malformed files, pickles and
    /// tensor names present in two files are errors naming the file.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut out =
            Self { paths: Vec::new(), mmaps: Vec::new(), entries: HashMap::new(), patches: None };
        for path in paths {
            let path = path.as_ref();
            refuse_pickle(path)?;
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the
            // file not being truncated while the model loads.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let bad = |message: String| Error::Safetensors { path: path.to_path_buf(), message };
            if mmap.len() >= 2 && &mmap[..2] == b"PK" {
                return Err(Error::Pickle { path: path.to_path_buf() });
            }
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    bad(match e {
                        safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                            "the file is shorter or longer than its header says (truncated?)"
                                .to_string()
                        }
                        e => e.to_string(),
                    })
                })?;
            let data_start = 8 + header_len;
            let file_idx = out.mmaps.len();
            for (name, info) in metadata.tensors() {
                let entry = TensorEntry {
                    file: file_idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                    transpose: false,
                };
                if let Some(prev) = out.entries.insert(name.clone(), entry) {
                    return Err(bad(format!(
                        "tensor `{name}` is also in {}",
                        out.paths[prev.file].display()
                    )));
                }
            }
            out.paths.push(path.to_path_buf());
            out.mmaps.push(mmap);
        }
        Ok(out)
    }

    /// The files with `patches` added to their tensors as they load (LoRA merged at load).
    pub fn with_patches(mut self, patches: Arc<WeightPatches>) -> Self {
        self.patches = if patches.is_empty() { None } else { Some(patches) };
        self
    }

    /// The files, in the order given.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of a tensor (`None` for a dtype candle cannot hold).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).and_then(|e| candle_dtype(e.dtype))
    }

    /// The file a tensor is stored in.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| self.paths[e.file].as_path())
    }

    /// Loads one tensor as `dtype` on `device`, then releases its mapped pages.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| Error::msg(format!("{}: no tensor named `{name}`", self.describe())))?;
        let path = &self.paths[entry.file];
        let stored = candle_dtype(entry.dtype).ok_or_else(|| Error::Safetensors {
            path: path.clone(),
            message: format!("tensor `{name}` has dtype {:?}, which ltd cannot load", entry.dtype),
        })?;
        if stored.is_float() != dtype.is_float() {
            return Err(Error::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}` is stored as {stored:?}, expected {dtype:?}"),
            });
        }
        let mmap = &self.mmaps[entry.file];
        let bytes = &mmap[entry.start..entry.end];
        let tensor = if entry.transpose {
            let rev: Vec<usize> = entry.shape.iter().rev().copied().collect();
            Tensor::from_raw_buffer(bytes, stored, &rev, device)?.t()?.contiguous()?
        } else {
            Tensor::from_raw_buffer(bytes, stored, &entry.shape, device)?
        };
        release_pages(mmap, entry.start, entry.end);
        let tensor = match &self.patches {
            // Patched in float32 and then cast, as peft merges into the loaded weights.
            Some(p) if p.contains(name) => p.apply(name, tensor.to_dtype(DType::F32)?)?,
            _ => tensor,
        };
        let tensor = if tensor.dtype() == dtype { tensor } else { tensor.to_dtype(dtype)? };
        Ok(tensor)
    }

    /// The same mapped files seen under other names: only the `aliases` exist in the view,
    /// each reading its bytes straight from the mapping of its source (a row range is a byte
    /// range, a reshape is the same bytes), so a checkpoint in another key layout loads with
    /// no conversion and no extra copy. An alias whose source is missing or whose shape does
    /// not fit is an error naming both.
    pub fn view(self, aliases: Vec<(String, Alias)>) -> Result<Self> {
        let mut entries = HashMap::with_capacity(aliases.len());
        for (name, alias) in aliases {
            let bad = |message: String| Error::msg(format!("{}: {message}", self.describe()));
            let src = self
                .entries
                .get(&alias.source)
                .ok_or_else(|| bad(format!("no tensor `{}` (for `{name}`)", alias.source)))?;
            let mut entry = src.clone();
            let total_rows = src.shape.first().copied().unwrap_or(1);
            let elements: usize = src.shape.iter().product();
            let mut stored_elements = elements;
            if let Some((a, b)) = alias.rows {
                if a > b || b > total_rows || elements == 0 {
                    return Err(bad(format!(
                        "rows {a}..{b} of `{}` {:?} (for `{name}`)",
                        alias.source, src.shape
                    )));
                }
                let row_bytes = (src.end - src.start) / total_rows;
                entry.start = src.start + a * row_bytes;
                entry.end = src.start + b * row_bytes;
                stored_elements = elements / total_rows * (b - a);
            }
            let wanted: usize = alias.shape.iter().product();
            if wanted != stored_elements || (alias.transpose && alias.shape.len() != 2) {
                return Err(bad(format!(
                    "`{}` {:?} cannot be seen as `{name}` {:?}",
                    alias.source, src.shape, alias.shape
                )));
            }
            entry.shape = alias.shape;
            entry.transpose = alias.transpose;
            if entries.insert(name.clone(), entry).is_some() {
                return Err(bad(format!("two tensors map to `{name}`")));
            }
        }
        Ok(Self { paths: self.paths, mmaps: self.mmaps, entries, patches: self.patches })
    }

    /// A short description of the files for messages.
    pub fn describe(&self) -> String {
        match self.paths.as_slice() {
            [one] => one.display().to_string(),
            many => many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        }
    }
}

/// Tells the kernel it may drop the mapped pages of a tensor we have copied out.
fn release_pages(mmap: &Mmap, start: usize, end: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let first = start.div_ceil(PAGE) * PAGE;
        let last = end / PAGE * PAGE;
        if last > first {
            // SAFETY: the mapping is a read-only view of an unchanged file, so dropped pages
            // are simply read again from the file if they are ever touched again.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (mmap, start, end);
}

fn candle_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I16 => DType::I16,
        _ => return None,
    })
}

/// The `VarBuilder` backend that checks requests against the files and records them.
struct CheckedBackend {
    files: Option<Arc<SafetensorsFiles>>,
    report: Arc<Mutex<LoadReport>>,
}

/// A zero-stride stand-in of the requested shape: costs one element whatever the shape.
fn placeholder(shape: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
}

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let mut report = self.report.lock().expect("load report lock poisoned");
        if let Some(prev) = report.requested.insert(name.to_string(), dims.clone()) {
            if prev != dims {
                report.mismatched.push(Mismatch {
                    name: name.to_string(),
                    expected: dims,
                    found: prev,
                });
                return placeholder(&s, dtype, dev);
            }
        }
        let Some(files) = &self.files else { return placeholder(&s, dtype, dev) };
        match files.shape(name) {
            None => {
                report.missing.push((name.to_string(), dims));
                placeholder(&s, dtype, dev)
            }
            Some(found) if found != dims.as_slice() => {
                report.mismatched.push(Mismatch {
                    name: name.to_string(),
                    expected: dims,
                    found: found.to_vec(),
                });
                placeholder(&s, dtype, dev)
            }
            Some(_) => {
                drop(report);
                match files.load(name, dtype, dev) {
                    Ok(t) => Ok(t),
                    Err(e) => {
                        let mut report = self.report.lock().expect("load report lock poisoned");
                        report.unreadable.push((name.to_string(), e.to_string()));
                        placeholder(&s, dtype, dev)
                    }
                }
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let files = self.files.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!("`{name}` was requested without a shape"))
        })?;
        let shape = files
            .shape(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        self.report
            .lock()
            .expect("load report lock poisoned")
            .requested
            .insert(name.to_string(), shape.to_vec());
        files.load(name, dtype, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.as_ref().is_some_and(|f| f.contains(name))
    }
}

fn run_checked<M>(
    files: Option<Arc<SafetensorsFiles>>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<(candle_core::Result<M>, LoadReport)> {
    let source = files.as_ref().map_or_else(|| "shapes only".to_string(), |f| f.describe());
    let report = Arc::new(Mutex::new(LoadReport { source, ..Default::default() }));
    let backend = CheckedBackend { files: files.clone(), report: report.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = build(vb);
    let mut report = report.lock().map_err(|_| Error::msg("load report lock poisoned"))?.clone();
    if let Some(files) = &files {
        report.unused = files
            .names()
            .into_iter()
            .filter(|n| !report.requested.contains_key(*n))
            .map(str::to_string)
            .collect();
    }
    Ok((built, report))
}

/// Builds a module from safetensors files, checking that every tensor it asks for is there
/// with the right shape. All problems are reported together; tensors in the files that the
/// module never asked for are logged, not refused (checkpoints often carry extra buffers).
pub fn load_checked<M>(
    files: Arc<SafetensorsFiles>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<M> {
    let (built, report) = run_checked(Some(files), dtype, device, build)?;
    if !report.is_complete() {
        return Err(Error::Load(Box::new(report)));
    }
    if !report.unused.is_empty() {
        tracing::warn!(
            source = %report.source,
            count = report.unused.len(),
            unused = %report.unused.join(", "),
            "tensors in the checkpoint were not used by the model"
        );
    }
    Ok(built?)
}

/// Builds a module without any weights and returns the names and shapes it asked for.
///
/// The module's tensors are zero-stride placeholders, so even full-size models cost almost
/// no memory; the module is only good for inspection.
pub fn record_shapes<M>(
    dtype: DType,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<(M, BTreeMap<String, Vec<usize>>)> {
    let (built, report) = run_checked(None, dtype, &Device::Cpu, build)?;
    if !report.mismatched.is_empty() {
        return Err(Error::Load(Box::new(report)));
    }
    Ok((built?, report.requested))
}

/// Finds the weight files of a diffusers/transformers component folder: a single
/// `{stem}[.{variant}].safetensors`, or the shards listed in its `.safetensors.index.json`.
/// A component without the requested variant falls back to its default weights (with a
/// warning), as diffusers does for mixed repositories. A folder holding only pickle checkpoints
/// is refused with an explanation.
pub fn component_weights(
    dir: &Path,
    stems: &[&str],
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let mut suffixes: Vec<String> = variant.map(|v| format!(".{v}")).into_iter().collect();
    suffixes.push(String::new());
    for suffix in &suffixes {
        for stem in stems {
            let found = if dir.join(format!("{stem}{suffix}.safetensors")).is_file() {
                Some(vec![dir.join(format!("{stem}{suffix}.safetensors"))])
            } else {
                let index = dir.join(format!("{stem}{suffix}.safetensors.index.json"));
                if index.is_file() {
                    Some(shards_from_index(&index)?)
                } else {
                    None
                }
            };
            if let Some(files) = found {
                if suffix.is_empty() && variant.is_some() {
                    tracing::warn!(
                        folder = %dir.display(),
                        "no `{}` variant; loading the default weights",
                        variant.unwrap_or_default()
                    );
                }
                return Ok(files);
            }
        }
    }
    for suffix in &suffixes {
        for stem in stems {
            for ext in PICKLE_EXTENSIONS {
                let pickle = dir.join(format!("{stem}{suffix}.{ext}"));
                if pickle.is_file() {
                    return Err(Error::Pickle { path: pickle });
                }
            }
        }
    }
    let wanted: Vec<String> = suffixes
        .iter()
        .flat_map(|suffix| stems.iter().map(move |s| format!("{s}{suffix}.safetensors")))
        .collect();
    Err(Error::msg(format!(
        "{}: no weights found (looked for {})",
        dir.display(),
        wanted.join(" or ")
    )))
}

/// The shard files named by a `*.safetensors.index.json`, in order, each once.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::msg(format!("{}: `weight_map` is empty", index.display())));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(dir: &Path) -> PathBuf {
        let path = dir.join("model.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::ones(4, DType::F16, &Device::Cpu).unwrap();
        let extra = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("m.a".to_string(), a), ("m.b".into(), b), ("extra".into(), extra)]),
            &path,
        )
        .unwrap();
        path
    }

    #[test]
    fn loads_converts_and_reports_unused() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(SafetensorsFiles::open(&[write_file(dir.path())]).unwrap());
        let (a, b) = load_checked(files, DType::F32, &Device::Cpu, |vb| {
            let vb = vb.pp("m");
            Ok((vb.get((2, 3), "a")?, vb.get(4, "b")?))
        })
        .unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[0., 1., 2.], [3., 4., 5.]]);
        assert_eq!(b.dtype(), DType::F32, "f16 weights are converted to the requested dtype");
        assert_eq!(b.to_vec1::<f32>().unwrap(), [1.; 4]);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(SafetensorsFiles::open(&[write_file(dir.path())]).unwrap());
        let err = load_checked(files, DType::F32, &Device::Cpu, |vb| {
            let vb = vb.pp("m");
            Ok((vb.get((3, 2), "a")?, vb.get(4, "nope")?, vb.get(2, "gone")?))
        })
        .unwrap_err();
        let Error::Load(report) = &err else { panic!("{err}") };
        assert_eq!(report.missing.len(), 2);
        assert_eq!(
            report.mismatched,
            [Mismatch { name: "m.a".into(), expected: vec![3, 2], found: vec![2, 3] }]
        );
        let msg = err.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("m.nope") && msg.contains("m.gone"),
            "{msg}"
        );
    }

    /// Runs `f` and returns what it logged (every level, no colours).
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        // tracing caches each callsite's interest globally. While only one dispatcher is
        // registered, a callsite first hit on another test's thread takes that thread's
        // (no-op) default's interest, "never", and our events are dropped. A second registered
        // dispatcher makes tracing combine all of them instead.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            f()
        });
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// Tensors the model never asked for are all named, in the warning of a complete load and
    /// in the error of an incomplete one, not only counted.
    #[test]
    fn names_every_unused_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t = || Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let names = ["m.w", "extra.one", "extra.two", "extra.three"];
        let tensors: HashMap<String, Tensor> = names.iter().map(|n| (n.to_string(), t())).collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let open = || Arc::new(SafetensorsFiles::open(&[&path]).unwrap());

        let logs = logs_of(|| {
            load_checked(open(), DType::F32, &Device::Cpu, |vb| vb.get(2, "m.w")).unwrap();
        });
        for name in &names[1..] {
            assert!(logs.contains(name), "the warning does not name {name}: {logs}");
        }

        let err = load_checked(open(), DType::F32, &Device::Cpu, |vb| vb.get(2, "m.gone"));
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("1 missing tensor(s): m.gone [2]"), "{msg}");
        assert!(msg.contains("4 unused tensor(s): "), "{msg}");
        for name in names {
            assert!(msg.contains(name), "the error does not name {name}: {msg}");
        }
    }

    /// Patches are added to the tensors they name as those load, in float32, before the cast
    /// to the requested dtype; other tensors load untouched.
    #[test]
    fn adds_patches_as_tensors_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut patches = WeightPatches::default();
        let up = Tensor::ones((2, 1), DType::F32, &Device::Cpu).unwrap();
        let down = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
        patches.add("m.a", crate::patch::LowRankDelta::new(&up, &down, 2.0, "lora").unwrap());
        let files = SafetensorsFiles::open(&[write_file(dir.path())]).unwrap();
        let files = Arc::new(files.with_patches(Arc::new(patches)));
        let (a, b) = load_checked(files, DType::F32, &Device::Cpu, |vb| {
            let vb = vb.pp("m");
            Ok((vb.get((2, 3), "a")?, vb.get(4, "b")?))
        })
        .unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[2., 3., 4.], [5., 6., 7.]]);
        assert_eq!(b.to_vec1::<f32>().unwrap(), [1.; 4]);
    }

    /// A renamed view reads rows, reshapes and transposes straight from the mapping.
    #[test]
    fn views_rename_split_reshape_and_transpose() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let qkv = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((6, 2)).unwrap();
        let conv = Tensor::arange(0f32, 4., &Device::Cpu).unwrap().reshape((2, 2, 1, 1)).unwrap();
        let proj = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([
                ("qkv".to_string(), qkv),
                ("conv".into(), conv),
                ("proj".into(), proj),
            ]),
            &path,
        )
        .unwrap();
        let alias = |source: &str, rows, shape: &[usize], transpose| Alias {
            source: source.into(),
            rows,
            shape: shape.to_vec(),
            transpose,
        };
        let files = SafetensorsFiles::open(&[&path]).unwrap();
        let view = files
            .view(vec![
                ("k".into(), alias("qkv", Some((2, 4)), &[2, 2], false)),
                ("linear".into(), alias("conv", None, &[2, 2], false)),
                ("proj_t".into(), alias("proj", None, &[3, 2], true)),
            ])
            .unwrap();
        assert_eq!(view.names(), ["k", "linear", "proj_t"]);
        let load = |n: &str| view.load(n, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(load("k").to_vec2::<f32>().unwrap(), [[4., 5.], [6., 7.]]);
        assert_eq!(load("linear").to_vec2::<f32>().unwrap(), [[0., 1.], [2., 3.]]);
        assert_eq!(load("proj_t").to_vec2::<f32>().unwrap(), [[0., 3.], [1., 4.], [2., 5.]]);

        let files = SafetensorsFiles::open(&[&path]).unwrap();
        let err = files.view(vec![("x".into(), alias("qkv", Some((4, 8)), &[4, 2], false))]);
        assert!(err.unwrap_err().to_string().contains("rows 4..8 of `qkv`"));
        let files = SafetensorsFiles::open(&[&path]).unwrap();
        let err = files.view(vec![("x".into(), alias("nope", None, &[1], false))]);
        assert!(err.unwrap_err().to_string().contains("no tensor `nope`"));
    }

    #[test]
    fn records_shapes_without_weights() {
        let (t, shapes) =
            record_shapes(DType::F32, |vb| vb.pp("x").get((1000, 1000, 100), "w")).unwrap();
        assert_eq!(t.dims(), [1000, 1000, 100]);
        assert_eq!(shapes.get("x.w").unwrap(), &vec![1000, 1000, 100]);
    }

    #[test]
    fn refuses_pickles_and_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = dir.path().join("diffusion_pytorch_model.bin");
        std::fs::write(&pickle, b"PK\x03\x04").unwrap();
        let err = SafetensorsFiles::open(&[&pickle]).unwrap_err().to_string();
        assert!(err.contains("refusing to load a pickle") && err.contains(".bin"), "{err}");
        let err = component_weights(dir.path(), &["diffusion_pytorch_model"], None).unwrap_err();
        assert!(matches!(err, Error::Pickle { .. }), "{err}");

        let path = write_file(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = SafetensorsFiles::open(&[&path]).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn finds_variants_and_shards() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("model.fp16.safetensors"), b"").unwrap();
        assert_eq!(
            component_weights(p, &["model"], Some("fp16")).unwrap(),
            [p.join("model.fp16.safetensors")]
        );
        std::fs::write(
            p.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors", "c": "model-00001.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            component_weights(p, &["diffusion_pytorch_model", "model"], None).unwrap(),
            [p.join("model-00001.safetensors"), p.join("model-00002.safetensors")]
        );
        let err = component_weights(p, &["nothing"], None).unwrap_err().to_string();
        assert!(err.contains("no weights found") && err.contains("nothing.safetensors"), "{err}");
    }
}
