//! Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"), added as
//! diffusers' `load_textual_inversion` adds them: the token (and `token_1`, `token_2`, … for
//! the further vectors of a multi-vector embedding) joins the tokenizer as a normal added token,
//! its vectors join the text encoder's token-embedding table at the new ids, and a prompt
//! naming the token has it expanded to `token token_1 …` before tokenizing
//! (`maybe_convert_prompt`).
//!
//! Layouts (`.safetensors` only; `.pt`/`.bin` embeddings are pickles and refused):
//! - AUTOMATIC1111: `emb_params` `[n, D]`; the token is the file stem, as in A1111.
//! - diffusers: one tensor named by its token (`<cat-toy>`), `[D]` or `[n, D]`.
//! - SDXL: `clip_l` `[n, 768]` for the first text encoder and `clip_g` `[n, 1280]` for the
//!   second; the token is the file stem.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ltd_nn::SafetensorsFiles;
use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};
use crate::lora::short_hex;
use crate::model_index::PipelineKind;

/// An embedding added to the pipeline, as the images' parameters record it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedEmbedding {
    /// The token a prompt uses.
    pub token: String,
    /// Vectors per text encoder.
    pub vectors: usize,
    /// A1111's short hash: the first 12 hex digits of the file's SHA-256.
    pub hash: String,
}

/// An embedding file's token and vectors, one `[n, D]` tensor per text encoder in order.
pub(crate) struct EmbeddingFile {
    pub token: String,
    pub vectors: Vec<Tensor>,
    pub loaded: LoadedEmbedding,
}

/// Reads an embedding file for a pipeline of `kind`.
pub(crate) fn read_embedding(path: &Path, kind: PipelineKind) -> Result<EmbeddingFile> {
    let file = path.display();
    let files = SafetensorsFiles::open(&[path]).map_err(|e| match e {
        ltd_nn::Error::Io { source, .. } => {
            PipelineError::msg(format!("--embedding {file}: {source}"))
        }
        other => PipelineError::msg(format!("--embedding {other}")),
    })?;
    let bad = |what: String| PipelineError::msg(format!("--embedding {file}: {what}"));
    let names = files.names();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let load = |name: &str| -> Result<Tensor> {
        let t = files.load(name, DType::F32, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        match t.rank() {
            1 => Ok(t.unsqueeze(0)?),
            2 => Ok(t),
            _ => Err(bad(format!("`{name}` has shape {:?}, expected [vectors, width]", t.dims()))),
        }
    };
    let sdxl = kind == PipelineKind::StableDiffusionXl;
    let (token, vectors) = if names.contains(&"clip_l") && names.contains(&"clip_g") {
        if !sdxl {
            return Err(bad(
                "an SDXL embedding (clip_l and clip_g) on an SD 1.x/2.x model".to_string()
            ));
        }
        (stem, vec![load("clip_l")?, load("clip_g")?])
    } else if let [one] = names.as_slice() {
        if sdxl {
            return Err(bad(format!(
                "an SD 1.x/2.x embedding (`{one}`) on an SDXL model, which needs clip_l and clip_g"
            )));
        }
        let token = if *one == "emb_params" { stem } else { one.to_string() };
        (token, vec![load(one)?])
    } else {
        return Err(bad(format!(
            "not a textual-inversion embedding: expected `emb_params` (AUTOMATIC1111), one tensor \
             named by its token (diffusers) or `clip_l` + `clip_g` (SDXL), found {}",
            names.join(", ")
        )));
    };
    let n = vectors[0].dim(0)?;
    if vectors.iter().any(|v| v.dim(0).ok() != Some(n)) || n == 0 {
        return Err(bad("clip_l and clip_g hold different numbers of vectors".into()));
    }
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return Err(bad(format!("{token:?} cannot be a token (empty, or has spaces)")));
    }
    let bytes = std::fs::read(path).map_err(|e| ltd_nn::Error::io(path, e))?;
    let hash = short_hex(&Sha256::digest(&bytes));
    let loaded = LoadedEmbedding { token: token.clone(), vectors: n, hash };
    Ok(EmbeddingFile { token, vectors, loaded })
}

/// The tokens of an `n`-vector embedding: `token`, `token_1`, …, `token_{n−1}`.
pub(crate) fn tokens(token: &str, n: usize) -> Vec<String> {
    std::iter::once(token.to_string()).chain((1..n).map(|i| format!("{token}_{i}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_vector_tokens() {
        assert_eq!(tokens("ink", 3), ["ink", "ink_1", "ink_2"]);
        assert_eq!(tokens("<cat>", 1), ["<cat>"]);
    }
}
