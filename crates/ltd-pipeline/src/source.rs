//! Where a model comes from: a local diffusers folder or a Hugging Face hub repository.
//!
//! Hub models are fetched through `hf-hub` into the standard cache (`HF_HOME`, default
//! `~/.cache/huggingface`; `HF_HUB_CACHE` overrides the hub folder), with the token from
//! `HF_TOKEN` or the cache's `token` file, and `HF_ENDPOINT` honoured. Only the files the
//! pipeline needs are fetched: `model_index.json`, the configs, the tokenizer files and the
//! safetensors weights of the components it uses (never pickles, safety checkers or feature
//! extractors). The cache's snapshot folder has the repository's layout, so once the files are
//! there the model loads exactly as a local folder does.
//!
//! `HF_HUB_OFFLINE=1` uses the cache only; a file missing from it is an error naming the file.
//! Online, the endpoint is first probed with a short connection timeout, so a machine without
//! network gets a clear error instead of a hang.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{PipelineError, Result};
use crate::model_index::{ComponentKind, ModelIndex, TextEncoderFamily};

/// How long the reachability probe of the hub endpoint waits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A model location as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local diffusers-format folder.
    Local(PathBuf),
    /// A hub repository id (`owner/name`), optionally at a revision (`owner/name@rev`).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
    },
}

impl ModelSource {
    /// An existing path is a local folder; otherwise `owner/name[@revision]` is a hub id;
    /// anything else is taken as a (missing) local path, so the error names it.
    pub fn parse(s: &str) -> Self {
        let path = Path::new(s);
        if path.exists() || s.starts_with('.') || s.starts_with('/') || s.starts_with('~') {
            return Self::Local(path.to_path_buf());
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            _ => (s, None),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !part.starts_with('.')
        };
        match repo.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) => {
                Self::Hub { repo: repo.to_string(), revision }
            }
            _ => Self::Local(path.to_path_buf()),
        }
    }

    /// The local folder holding the model's files, fetching what is needed from the hub.
    pub fn resolve(&self, variant: Option<&str>) -> Result<PathBuf> {
        match self {
            Self::Local(path) => {
                if !path.is_dir() {
                    return Err(PipelineError::msg(format!(
                        "{}: no such model folder (expected a diffusers folder with \
                         model_index.json, or a hub repo id like owner/name)",
                        path.display()
                    )));
                }
                Ok(path.clone())
            }
            Self::Hub { repo, revision } => Hub::new(repo, revision.as_deref())?.fetch(variant),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision: None } => write!(f, "{repo}"),
            Self::Hub { repo, revision: Some(r) } => write!(f, "{repo}@{r}"),
        }
    }
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation (as huggingface_hub reads it).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The hub cache as huggingface_hub locates it.
fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

struct Hub {
    repo: Repo,
    id: String,
    cache: Cache,
    offline: bool,
}

impl Hub {
    fn new(id: &str, revision: Option<&str>) -> Result<Self> {
        let repo = match revision {
            Some(rev) => Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()),
            None => Repo::new(id.to_string(), RepoType::Model),
        };
        Ok(Self { repo, id: id.to_string(), cache: hub_cache(), offline: hub_offline() })
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.repo(self.repo.clone()).get(file)
    }

    /// The snapshot folder, given the cached path of one of its files.
    fn snapshot_root(file_path: &Path, file: &str) -> PathBuf {
        let depth = Path::new(file).components().count();
        let mut root = file_path.to_path_buf();
        for _ in 0..depth {
            root.pop();
        }
        root
    }

    fn fetch(&self, variant: Option<&str>) -> Result<PathBuf> {
        if self.offline {
            return self.cached_snapshot(variant);
        }
        let api = self.api()?;
        let repo = api.repo(self.repo.clone());
        let index_path = self.download(&repo, "model_index.json")?;
        let root = Self::snapshot_root(&index_path, "model_index.json");
        let index = ModelIndex::read(&index_path)?;
        let listing: Vec<String> = repo
            .info()
            .map_err(|e| self.hub_error("list the files of", e))?
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .collect();
        let exists = |f: &str| listing.iter().any(|l| l == f);
        for file in needed_files(&index, variant, &exists)? {
            let path = self.download(&repo, &file)?;
            for shard in shards_of(&file, &path)? {
                self.download(&repo, &shard)?;
            }
        }
        Ok(root)
    }

    fn cached_snapshot(&self, variant: Option<&str>) -> Result<PathBuf> {
        let not_cached = |file: &str| {
            PipelineError::msg(format!(
                "{}: `{file}` is not in the hub cache ({}) and HF_HUB_OFFLINE is set; run once \
                 online to download it, or pass a local folder",
                self.id,
                self.cache.path().display()
            ))
        };
        let index_path =
            self.cached("model_index.json").ok_or_else(|| not_cached("model_index.json"))?;
        let root = Self::snapshot_root(&index_path, "model_index.json");
        let index = ModelIndex::read(&index_path)?;
        let exists = |f: &str| self.cached(f).is_some();
        for file in needed_files(&index, variant, &exists)? {
            let path = self.cached(&file).ok_or_else(|| not_cached(&file))?;
            for shard in shards_of(&file, &path)? {
                self.cached(&shard).ok_or_else(|| not_cached(&shard))?;
            }
        }
        Ok(root)
    }

    fn api(&self) -> Result<Api> {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
        probe(&endpoint).map_err(|why| {
            PipelineError::msg(format!(
                "{}: cannot reach the hub at {endpoint} ({why}); check the network, or set \
                 HF_HUB_OFFLINE=1 to use only files already in the cache",
                self.id
            ))
        })?;
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty());
        let mut builder = ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(endpoint)
            .with_progress(false)
            .with_retries(2);
        if token.is_some() {
            builder = builder.with_token(token);
        }
        builder.build().map_err(|e| self.hub_error("connect for", e))
    }

    fn download(&self, repo: &ApiRepo, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(file) {
            return Ok(path);
        }
        tracing::info!(repo = %self.id, file, "downloading");
        repo.get(file).map_err(|e| self.hub_error(&format!("download `{file}` of"), e))
    }

    fn hub_error(&self, what: &str, e: hf_hub::api::sync::ApiError) -> PipelineError {
        let hint = if e.to_string().contains("401") || e.to_string().contains("403") {
            " (a gated or private repo needs a token: set HF_TOKEN or log in with `hf auth login`)"
        } else {
            ""
        };
        PipelineError::msg(format!("could not {what} {}: {e}{hint}", self.id))
    }
}

/// The shard files (repository paths) named by a weights index; none for other files.
fn shards_of(file: &str, local: &Path) -> Result<Vec<String>> {
    if !file.ends_with(".safetensors.index.json") {
        return Ok(Vec::new());
    }
    let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
    Ok(ltd_nn::weights::shards_from_index(local)?
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| format!("{dir}/{}", n.to_string_lossy())))
        .collect())
}

/// Checks that the endpoint's host accepts a TCP connection within [`PROBE_TIMEOUT`].
fn probe(endpoint: &str) -> std::result::Result<(), String> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let default_port = if endpoint.starts_with("http://") { 80 } else { 443 };
    let addr = if host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| e.to_string())?.collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The repository files the pipeline needs, given the model index and a way to ask whether a
/// file exists. Weights are safetensors only: a component that has only pickles is an error.
pub fn needed_files(
    index: &ModelIndex,
    variant: Option<&str>,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for (name, kind) in index.loadable_components() {
        match kind {
            ComponentKind::Scheduler => files.push(format!("{name}/scheduler_config.json")),
            ComponentKind::ClipTokenizer => files.extend(tokenizer_files(name, exists)),
            ComponentKind::ClipOrT5Tokenizer => match index.text_encoder_family {
                TextEncoderFamily::Clip => files.extend(tokenizer_files(name, exists)),
                TextEncoderFamily::T5 => files.extend(t5_tokenizer_files(name, exists)),
            },
            ComponentKind::T5Tokenizer => files.extend(t5_tokenizer_files(name, exists)),
            ComponentKind::TextEncoder
            | ComponentKind::ClipOrT5TextEncoder
            | ComponentKind::T5TextEncoder
            | ComponentKind::Unet
            | ComponentKind::Vae => {
                files.push(format!("{name}/config.json"));
                let stem = if matches!(
                    kind,
                    ComponentKind::TextEncoder
                        | ComponentKind::ClipOrT5TextEncoder
                        | ComponentKind::T5TextEncoder
                ) {
                    "model"
                } else {
                    "diffusion_pytorch_model"
                };
                files.extend(weight_files(name, stem, variant, exists)?);
            }
        }
    }
    Ok(files)
}

/// The files of a CLIP tokenizer folder, following what `CLIPTokenizer::from_folder` reads:
/// the vocabulary and merges from `tokenizer.json` when there is one, else from `vocab.json` +
/// `merges.txt` (then required, so a folder with neither fails naming them); the two
/// configuration files when present (the loader has defaults for both). `exists` is the hub
/// listing online and the cache offline, where a file an earlier run did not fetch (because
/// the repo lacks it) is absent, so the choice is the same both ways.
fn tokenizer_files(dir: &str, exists: &dyn Fn(&str) -> bool) -> Vec<String> {
    let path = |f: &str| format!("{dir}/{f}");
    let vocabulary: &[&str] = if exists(&path("tokenizer.json")) {
        &["tokenizer.json"]
    } else {
        &["vocab.json", "merges.txt"]
    };
    let optional = ["tokenizer_config.json", "special_tokens_map.json"]
        .into_iter()
        .filter(|f| exists(&path(f)));
    vocabulary.iter().copied().chain(optional).map(path).collect()
}

/// The files of a T5 tokenizer folder, following what `T5Tokenizer::from_folder` reads:
/// `tokenizer.json` when there is one, else the SentencePiece model `spiece.model` (then
/// required, so a folder with neither fails naming it), and the two configuration files when
/// present.
fn t5_tokenizer_files(dir: &str, exists: &dyn Fn(&str) -> bool) -> Vec<String> {
    let path = |f: &str| format!("{dir}/{f}");
    let model = if exists(&path("tokenizer.json")) { "tokenizer.json" } else { "spiece.model" };
    let optional = ["tokenizer_config.json", "special_tokens_map.json"]
        .into_iter()
        .filter(|f| exists(&path(f)));
    std::iter::once(model).chain(optional).map(path).collect()
}

fn weight_files(
    dir: &str,
    stem: &str,
    variant: Option<&str>,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let variants: Vec<Option<&str>> = match variant {
        Some(v) => vec![Some(v), None],
        None => vec![None],
    };
    for v in variants {
        let suffix = v.map(|v| format!(".{v}")).unwrap_or_default();
        let single = format!("{dir}/{stem}{suffix}.safetensors");
        if exists(&single) {
            if v.is_none() && variant.is_some() {
                tracing::warn!(
                    component = dir,
                    "no `{}` variant; using the default weights",
                    variant.unwrap_or("")
                );
            }
            return Ok(vec![single]);
        }
        let index = format!("{dir}/{stem}{suffix}.safetensors.index.json");
        if exists(&index) {
            // The shards are named inside the index: the caller fetches them after it.
            return Ok(vec![index]);
        }
    }
    let pickle = [".bin", ".ckpt"].iter().any(|ext| exists(&format!("{dir}/{stem}{ext}")));
    let why = if pickle {
        " (only a pickle checkpoint is published; ltd loads safetensors only, since \
         unpickling can run arbitrary code)"
    } else {
        ""
    };
    Err(PipelineError::msg(format!("no safetensors weights for `{dir}`{why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("stable-diffusion-v1-5/stable-diffusion-v1-5"),
            ModelSource::Hub {
                repo: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
                revision: None
            }
        );
        assert_eq!(
            ModelSource::parse("stabilityai/sdxl-turbo@fp16"),
            ModelSource::Hub {
                repo: "stabilityai/sdxl-turbo".into(),
                revision: Some("fp16".into())
            }
        );
        assert_eq!(ModelSource::parse("./models/x"), ModelSource::Local("./models/x".into()));
        assert_eq!(ModelSource::parse("a/b/c"), ModelSource::Local("a/b/c".into()));
        assert_eq!(ModelSource::parse("plainname"), ModelSource::Local("plainname".into()));
    }

    /// The tokenizer files `needed_files` asks for when the repository holds `present`.
    fn tokenizer_check(present: &[&str], expect: &[&str]) {
        let exists = |f: &str| present.iter().any(|p| format!("tokenizer/{p}") == f);
        let got: Vec<String> = tokenizer_files("tokenizer", &exists);
        let want: Vec<String> = expect.iter().map(|f| format!("tokenizer/{f}")).collect();
        assert_eq!(got, want, "repository holds {present:?}");
    }

    #[test]
    fn tokenizer_files_follow_what_the_folder_can_load_from() {
        // tokenizer.json alone is a complete tokenizer: nothing else is asked for.
        tokenizer_check(&["tokenizer.json"], &["tokenizer.json"]);
        tokenizer_check(
            &["tokenizer.json", "tokenizer_config.json"],
            &["tokenizer.json", "tokenizer_config.json"],
        );
        // With both layouts, tokenizer.json is what the loader reads.
        tokenizer_check(
            &["vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json"],
            &["tokenizer.json", "special_tokens_map.json"],
        );
        // The official SD repos' layout.
        tokenizer_check(
            &["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
            &["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"],
        );
        // Neither: vocab.json and merges.txt are required, so fetching them fails naming them.
        tokenizer_check(&[], &["vocab.json", "merges.txt"]);
    }

    #[test]
    fn needed_files_of_a_repo_with_only_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model_index.json");
        std::fs::write(
            &index,
            r#"{"_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]}"#,
        )
        .unwrap();
        let index = ModelIndex::read(&index).unwrap();
        let repo = [
            "tokenizer/tokenizer.json",
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let files = needed_files(&index, None, &|f| repo.contains(&f)).unwrap();
        let tokenizer: Vec<&String> =
            files.iter().filter(|f| f.starts_with("tokenizer/")).collect();
        assert_eq!(tokenizer, ["tokenizer/tokenizer.json"]);
        // Every file asked for is in the repository, so fetching cannot fail on a 404.
        for f in files.iter().filter(|f| !f.ends_with("config.json")) {
            assert!(repo.contains(&f.as_str()), "{f} is not in the repository");
        }
    }

    /// A T5 pipeline's repository, as t5-v1_1 / DeepFloyd IF ship the tokenizer (spiece.model,
    /// no tokenizer.json) or as transformers 5 saves it (tokenizer.json).
    #[test]
    fn needed_files_of_a_t5_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model_index.json");
        std::fs::write(
            &index,
            r#"{"_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5TokenizerFast"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]}"#,
        )
        .unwrap();
        let index = ModelIndex::read(&index).unwrap();
        let tokenizer = |repo: &[&str]| -> Vec<String> {
            let files = needed_files(&index, None, &|f| repo.contains(&f)).unwrap();
            files.into_iter().filter(|f| f.starts_with("tokenizer/")).collect()
        };
        let weights = [
            "text_encoder/model.safetensors.index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ];
        let spm: Vec<&str> = weights
            .iter()
            .copied()
            .chain(["tokenizer/spiece.model", "tokenizer/special_tokens_map.json"])
            .collect();
        assert_eq!(
            tokenizer(&spm),
            ["tokenizer/spiece.model", "tokenizer/special_tokens_map.json"]
        );
        let both: Vec<&str> = spm.iter().copied().chain(["tokenizer/tokenizer.json"]).collect();
        assert_eq!(
            tokenizer(&both),
            ["tokenizer/tokenizer.json", "tokenizer/special_tokens_map.json"]
        );
        // Neither: spiece.model is asked for, so fetching fails naming it.
        assert_eq!(tokenizer(&weights), ["tokenizer/spiece.model"]);
        let files = needed_files(&index, None, &|f| weights.contains(&f)).unwrap();
        assert!(files.contains(&"text_encoder/model.safetensors.index.json".to_string()));
    }

    #[test]
    fn probe_fails_fast_on_a_closed_port() {
        let start = std::time::Instant::now();
        assert!(probe("http://127.0.0.1:1").is_err());
        assert!(start.elapsed() < PROBE_TIMEOUT);
    }
}
