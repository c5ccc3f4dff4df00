//! `model_index.json`: which pipeline a folder holds and which components it is made of.
//!
//! The pipeline class decides the generation procedure; every component is then built from its
//! own folder and config. Nothing here knows about model versions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{PipelineError, Result};

/// The generation procedures ltd implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline` (SD 1.x, 2.x): one CLIP text encoder.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: two CLIP text encoders, pooled embeddings, time ids.
    StableDiffusionXl,
    /// DeepFloyd IF stage I (`IFPipeline`): a T5 text encoder and a pixel-space U-Net that
    /// also predicts its variance; no VAE.
    DeepFloydIf,
    /// DeepFloyd IF stage II (`IFSuperResolutionPipeline`): stage I's layout plus the
    /// `image_noising_scheduler` that noises the upscaled low-resolution image the U-Net is
    /// conditioned on.
    DeepFloydIfSuperResolution,
}

impl PipelineKind {
    /// The pipeline classes we accept for each kind (text-to-image, image-to-image and
    /// inpainting checkpoints share their layout; an inpainting U-Net's 9 input channels are
    /// read from its config).
    fn from_class(class: &str) -> Option<Self> {
        Some(match class {
            "StableDiffusionPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline" => Self::StableDiffusion,
            "StableDiffusionXLPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
            | "StableDiffusionXLInpaintPipeline" => Self::StableDiffusionXl,
            "IFPipeline" => Self::DeepFloydIf,
            "IFSuperResolutionPipeline" => Self::DeepFloydIfSuperResolution,
            _ => return None,
        })
    }

    /// The components this kind needs, with what each must be.
    fn required(self) -> &'static [(&'static str, ComponentKind)] {
        use ComponentKind::*;
        match self {
            Self::StableDiffusion => &[
                ("scheduler", Scheduler),
                ("text_encoder", ClipOrT5TextEncoder),
                ("tokenizer", ClipOrT5Tokenizer),
                ("unet", Unet),
                ("vae", Vae),
            ],
            Self::StableDiffusionXl => &[
                ("scheduler", Scheduler),
                ("text_encoder", TextEncoder),
                ("text_encoder_2", TextEncoder),
                ("tokenizer", ClipTokenizer),
                ("tokenizer_2", ClipTokenizer),
                ("unet", Unet),
                ("vae", Vae),
            ],
            Self::DeepFloydIf => &[
                ("scheduler", Scheduler),
                ("text_encoder", T5TextEncoder),
                ("tokenizer", T5Tokenizer),
                ("unet", Unet),
            ],
            Self::DeepFloydIfSuperResolution => &[
                ("image_noising_scheduler", Scheduler),
                ("scheduler", Scheduler),
                ("text_encoder", T5TextEncoder),
                ("tokenizer", T5Tokenizer),
                ("unet", Unet),
            ],
        }
    }

    /// DeepFloyd IF (either stage): pixel space, no VAE.
    pub fn is_deepfloyd(self) -> bool {
        matches!(self, Self::DeepFloydIf | Self::DeepFloydIfSuperResolution)
    }
}

/// What a component folder holds, as far as loading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// `scheduler_config.json`.
    Scheduler,
    /// A CLIP BPE tokenizer folder.
    ClipTokenizer,
    /// A CLIP text encoder (with or without projection).
    TextEncoder,
    /// A CLIP text encoder or a `T5EncoderModel` (`StableDiffusionPipeline` runs either).
    ClipOrT5TextEncoder,
    /// A CLIP BPE or a T5 unigram tokenizer.
    ClipOrT5Tokenizer,
    /// A `T5EncoderModel` (DeepFloyd IF).
    T5TextEncoder,
    /// A T5 unigram tokenizer (DeepFloyd IF).
    T5Tokenizer,
    /// `UNet2DConditionModel`.
    Unet,
    /// `AutoencoderKL`.
    Vae,
}

impl ComponentKind {
    fn accepts(self, library: &str, class: &str) -> bool {
        match self {
            Self::Scheduler => library == "diffusers" && class.ends_with("Scheduler"),
            Self::ClipTokenizer => matches!(class, "CLIPTokenizer" | "CLIPTokenizerFast"),
            Self::TextEncoder => {
                matches!(class, "CLIPTextModel" | "CLIPTextModelWithProjection")
            }
            Self::ClipOrT5TextEncoder => {
                Self::TextEncoder.accepts(library, class) || class == T5_TEXT_ENCODER
            }
            Self::ClipOrT5Tokenizer => {
                Self::ClipTokenizer.accepts(library, class) || T5_TOKENIZERS.contains(&class)
            }
            Self::T5TextEncoder => class == T5_TEXT_ENCODER,
            Self::T5Tokenizer => T5_TOKENIZERS.contains(&class),
            Self::Unet => class == "UNet2DConditionModel",
            Self::Vae => class == "AutoencoderKL",
        }
    }
}

/// The class of a T5 text encoder in `model_index.json`.
const T5_TEXT_ENCODER: &str = "T5EncoderModel";
/// The classes of T5 tokenizers (transformers 5 made the fast one the only one; folders name
/// either).
const T5_TOKENIZERS: [&str; 2] = ["T5Tokenizer", "T5TokenizerFast"];

/// Which text encoder family a pipeline's `text_encoder` is, as `model_index.json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderFamily {
    /// CLIP (`CLIPTextModel`, `CLIPTextModelWithProjection`) with a CLIP BPE tokenizer.
    Clip,
    /// `T5EncoderModel` with a T5 unigram tokenizer.
    T5,
}

/// A parsed `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// The file it was read from.
    pub path: PathBuf,
    /// `_class_name`.
    pub class_name: String,
    /// The procedure that class stands for.
    pub kind: PipelineKind,
    /// Component name → (library, class); `None` for components set to `[null, null]`.
    pub components: BTreeMap<String, Option<(String, String)>>,
    /// SDXL: an absent negative prompt means zero embeddings (diffusers' default: true).
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL image-to-image: the time ids end in an aesthetic score instead of the target size
    /// (diffusers' `requires_aesthetics_score`, default false; the refiner sets it).
    pub requires_aesthetics_score: bool,
    /// The SDXL refiner's layout: `text_encoder` and `tokenizer` are `[null, null]`, only the
    /// OpenCLIP encoder (`text_encoder_2`) conditions the U-Net.
    pub refiner: bool,
    /// The family of `text_encoder` (and of `tokenizer`, which must match it).
    pub text_encoder_family: TextEncoderFamily,
    /// DeepFloyd IF saved without its T5 (`text_encoder`/`tokenizer` `[null, null]`, as
    /// `from_pretrained(..., text_encoder=None)` saves it): it runs only on prompt embeddings
    /// computed by another pipeline (a stage II after stage I).
    pub no_text_encoder: bool,
}

/// The components an SDXL refiner folder sets to `[null, null]`.
const REFINER_ABSENT: [&str; 2] = ["text_encoder", "tokenizer"];

/// Whether an SDXL index has the refiner's layout: both first-encoder components explicitly
/// null (a folder merely missing them is broken, not a refiner).
fn is_refiner_layout(
    kind: PipelineKind,
    components: &BTreeMap<String, Option<(String, String)>>,
) -> bool {
    kind == PipelineKind::StableDiffusionXl
        && REFINER_ABSENT.iter().all(|name| matches!(components.get(*name), Some(None)))
}

impl ModelIndex {
    /// Reads and checks `model_index.json`; errors name the file and the field.
    pub fn read(path: &Path) -> Result<Self> {
        let value: Value = ltd_nn::read_json(path)?;
        Self::from_value(&value, path)
    }

    fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let bad = |field: &str, message: String| PipelineError::ModelIndex {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let obj = value.as_object().ok_or_else(|| bad(".", "expected a JSON object".into()))?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("_class_name", "missing or not a string".into()))?
            .to_string();
        let kind = PipelineKind::from_class(&class_name).ok_or_else(|| {
            bad(
                "_class_name",
                format!(
                    "unsupported pipeline class {class_name:?}: ltd runs StableDiffusionPipeline \
                     and StableDiffusionXLPipeline checkpoints (and their Img2Img and Inpaint \
                     variants), and DeepFloyd IF's IFPipeline and IFSuperResolutionPipeline"
                ),
            )
        })?;
        let mut components = BTreeMap::new();
        for (name, v) in obj {
            if name.starts_with('_') {
                continue;
            }
            let Some(pair) = v.as_array() else { continue };
            let entry = match pair.as_slice() {
                [Value::String(lib), Value::String(class)] => Some((lib.clone(), class.clone())),
                [Value::Null, Value::Null] => None,
                _ => {
                    return Err(bad(name, format!("expected [library, class], found {v}")));
                }
            };
            components.insert(name.clone(), entry);
        }
        let refiner = is_refiner_layout(kind, &components);
        // The same two components, null in an IF folder saved without its text encoder.
        let no_text_encoder = kind.is_deepfloyd()
            && REFINER_ABSENT.iter().all(|name| matches!(components.get(*name), Some(None)));
        for (name, want) in kind.required() {
            if (refiner || no_text_encoder) && REFINER_ABSENT.contains(name) {
                continue;
            }
            match components.get(*name) {
                Some(Some((lib, class))) if want.accepts(lib, class) => {}
                Some(Some((lib, class))) => {
                    return Err(bad(name, format!("unsupported component [{lib:?}, {class:?}]")));
                }
                _ => {
                    return Err(bad(
                        name,
                        format!("{class_name} needs a `{name}` component, and this model has none"),
                    ))
                }
            }
        }
        let force_zeros_for_empty_prompt =
            obj.get("force_zeros_for_empty_prompt").and_then(Value::as_bool).unwrap_or(true);
        let requires_aesthetics_score =
            obj.get("requires_aesthetics_score").and_then(Value::as_bool).unwrap_or(false);
        let class_of = |name: &str| match components.get(name) {
            Some(Some((_, class))) => class.as_str(),
            _ => "",
        };
        let text_encoder_family =
            if class_of("text_encoder") == T5_TEXT_ENCODER || kind.is_deepfloyd() {
                TextEncoderFamily::T5
            } else {
                TextEncoderFamily::Clip
            };
        // diffusers would feed one vocabulary's ids to the other's embedding table.
        let tokenizer = class_of("tokenizer");
        if !no_text_encoder
            && T5_TOKENIZERS.contains(&tokenizer) != (text_encoder_family == TextEncoderFamily::T5)
        {
            return Err(bad(
                "tokenizer",
                format!(
                    "a {} text encoder needs a {} tokenizer, not {tokenizer:?}",
                    class_of("text_encoder"),
                    match text_encoder_family {
                        TextEncoderFamily::T5 => "T5 (T5Tokenizer or T5TokenizerFast)",
                        TextEncoderFamily::Clip => "CLIP (CLIPTokenizer)",
                    }
                ),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            class_name,
            kind,
            components,
            force_zeros_for_empty_prompt,
            requires_aesthetics_score,
            refiner,
            text_encoder_family,
            no_text_encoder,
        })
    }

    /// The components the pipeline loads, with what they are (in a stable order).
    pub fn loadable_components(&self) -> Vec<(&'static str, ComponentKind)> {
        let mut parts = self.kind.required().to_vec();
        if self.refiner || self.no_text_encoder {
            parts.retain(|(name, _)| !REFINER_ABSENT.contains(name));
        }
        parts
    }

    /// The `(library, class)` a component names, if it is not `[null, null]`.
    pub fn class_of(&self, component: &str) -> Option<&str> {
        self.components.get(component)?.as_ref().map(|(_, class)| class.as_str())
    }

    /// The folder the index sits in.
    pub fn root(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelIndex> {
        ModelIndex::from_value(
            &serde_json::from_str(json).unwrap(),
            Path::new("m/model_index.json"),
        )
    }

    const SD: &str = r#"{"_class_name": "StableDiffusionPipeline", "safety_checker": [null, null],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": false}"#;

    #[test]
    fn reads_a_stable_diffusion_index() {
        let idx = parse(SD).unwrap();
        assert_eq!(idx.kind, PipelineKind::StableDiffusion);
        assert_eq!(idx.components["safety_checker"], None);
        assert_eq!(idx.loadable_components().len(), 5);
    }

    #[test]
    fn reads_inpainting_indexes() {
        let idx = parse(&SD.replace("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"));
        assert_eq!(idx.unwrap().kind, PipelineKind::StableDiffusion);
    }

    #[test]
    fn a_t5_text_encoder_takes_a_t5_tokenizer() {
        for tokenizer in ["T5Tokenizer", "T5TokenizerFast"] {
            let json = SD
                .replace("\"CLIPTextModel\"", "\"T5EncoderModel\"")
                .replace("\"CLIPTokenizer\"", &format!("{tokenizer:?}"));
            let idx = parse(&json).unwrap();
            assert_eq!(idx.text_encoder_family, TextEncoderFamily::T5);
            assert_eq!(idx.class_of("tokenizer"), Some(tokenizer));
        }
        assert_eq!(parse(SD).unwrap().text_encoder_family, TextEncoderFamily::Clip);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let err = parse(&SD.replace("StableDiffusionPipeline", "KandinskyPipeline")).unwrap_err();
        assert!(err.to_string().contains("m/model_index.json: field `_class_name`: unsupported pipeline class \"KandinskyPipeline\""), "{err}");
        let err = parse(&SD.replace("\"unet\": [\"diffusers\", \"UNet2DConditionModel\"],", ""))
            .unwrap_err();
        assert!(
            err.to_string().contains("field `unet`") && err.to_string().contains("needs a `unet`"),
            "{err}"
        );
        let err = parse(&SD.replace("AutoencoderKL", "AutoencoderTiny")).unwrap_err();
        assert!(err.to_string().contains("unsupported component"), "{err}");
        let err = parse(&SD.replace("\"CLIPTextModel\"", "\"T5EncoderModel\"")).unwrap_err();
        assert!(
            err.to_string().contains("field `tokenizer`: a T5EncoderModel text encoder needs a T5"),
            "{err}"
        );
        let err = parse(&SD.replace("\"CLIPTokenizer\"", "\"T5Tokenizer\"")).unwrap_err();
        assert!(err.to_string().contains("needs a CLIP (CLIPTokenizer) tokenizer"), "{err}");
        let sdxl_t5 = SD
            .replace("StableDiffusionPipeline", "StableDiffusionXLPipeline")
            .replace("\"CLIPTextModel\"", "\"T5EncoderModel\"")
            .replace("\"CLIPTokenizer\"", "\"T5Tokenizer\"");
        let err = parse(&sdxl_t5).unwrap_err();
        assert!(err.to_string().contains("unsupported component"), "{err}");
        let err = parse(r#"["x"]"#).unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    const IF_II: &str = r#"{"_class_name": "IFSuperResolutionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["deepfloyd_if", "IFSafetyChecker"], "watermarker": ["deepfloyd_if", "IFWatermarker"],
        "image_noising_scheduler": ["diffusers", "DDPMScheduler"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"]}"#;

    #[test]
    fn reads_deepfloyd_if_indexes() {
        let idx = parse(IF_II).unwrap();
        assert_eq!(idx.kind, PipelineKind::DeepFloydIfSuperResolution);
        assert!(!idx.no_text_encoder && idx.text_encoder_family == TextEncoderFamily::T5);
        let names: Vec<_> = idx.loadable_components().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["image_noising_scheduler", "scheduler", "text_encoder", "tokenizer", "unet"]
        );
        let one = IF_II
            .replace("IFSuperResolutionPipeline", "IFPipeline")
            .replace("\"image_noising_scheduler\": [\"diffusers\", \"DDPMScheduler\"],", "");
        assert_eq!(parse(&one).unwrap().kind, PipelineKind::DeepFloydIf);
        // Saved with text_encoder=None: runs on given embeddings only.
        let bare = IF_II
            .replace("[\"transformers\", \"T5EncoderModel\"]", "[null, null]")
            .replace("[\"transformers\", \"T5Tokenizer\"]", "[null, null]");
        let idx = parse(&bare).unwrap();
        assert!(idx.no_text_encoder);
        assert_eq!(idx.loadable_components().len(), 3);
        // Stage II without its noising scheduler cannot run.
        let err = parse(&IF_II.replace("image_noising_scheduler", "other")).unwrap_err();
        assert!(err.to_string().contains("field `image_noising_scheduler`"), "{err}");
        let err = parse(&IF_II.replace("T5EncoderModel", "CLIPTextModel")).unwrap_err();
        assert!(err.to_string().contains("unsupported component"), "{err}");
    }

    const REFINER: &str = r#"{"_class_name": "StableDiffusionXLImg2ImgPipeline",
        "force_zeros_for_empty_prompt": false, "requires_aesthetics_score": true,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": [null, null],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": [null, null],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}"#;

    #[test]
    fn reads_the_refiner_layout() {
        let idx = parse(REFINER).unwrap();
        assert!(idx.refiner && idx.requires_aesthetics_score && !idx.force_zeros_for_empty_prompt);
        let names: Vec<_> = idx.loadable_components().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"]);
        // Only an explicit null makes a refiner: a missing first encoder is a broken folder.
        let err = parse(&REFINER.replace(r#""text_encoder": [null, null],"#, "")).unwrap_err();
        assert!(err.to_string().contains("needs a `text_encoder`"), "{err}");
        let err = parse(r#"["x"]"#).unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }
}
