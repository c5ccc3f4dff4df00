//! Text-to-image, image-to-image and inpainting with Stable Diffusion 1.x, 2.x and XL models
//! in diffusers layout: model folders (local or from the hub), prompt encoding,
//! classifier-free guidance, the denoising loop and decoding; the SDXL refiner and the
//! base→refiner hand-off (`refiner`), AUTOMATIC1111's hires fix (`hires`) and seed
//! conventions (`seeds`); DeepFloyd IF's pixel-space stages and their cascade
//! (`generate::deepfloyd`).
//!
//! ```no_run
//! use ltd_pipeline::{GenerateRequest, LoadOptions, ModelSource, Pipeline};
//! # fn main() -> ltd_pipeline::Result<()> {
//! let pipe = Pipeline::load(&ModelSource::parse("./my-model"), &LoadOptions::default())?;
//! let req = GenerateRequest { prompts: vec!["a cat in a hat".into()], seed: 42, ..Default::default() };
//! let out = pipe.generate(&req, &mut |p| eprintln!("step {}/{}", p.step, p.total))?;
//! println!("{}", out.images[0].params.to_infotext());
//! # Ok(()) }
//! ```

pub mod error;
pub mod generate;
pub mod guidance;
pub mod hires;
pub mod image;
pub mod image_processor;
pub mod lora;
pub mod model_index;
pub mod params;
pub mod pipeline;
mod preview;
mod quantize;
pub mod refiner;
pub mod request;
pub mod seeds;
pub mod single_file;
pub mod source;
mod text;
pub mod textual_inversion;

pub use error::{PipelineError, Result};
pub use generate::deepfloyd::{IfUpscale, DEFAULT_NOISE_LEVEL};
pub use generate::{GeneratedImage, Generation, Progress, Timings};
pub use hires::{HiresFix, HiresUpscaler};
pub use image::RgbImage;
pub use image_processor::{outpaint_canvas, OutpaintFill};
pub use lora::{extract_lora_tags, LoadedLora, LoraSpec};
pub use ltd_scheduler::SamplerKind;
pub use model_index::{ModelIndex, PipelineKind};
pub use params::GenerationParams;
pub use pipeline::{LoadOptions, Pipeline};
pub use request::Inpaint;
pub use request::{
    parse_sampler, DynamicThreshold, Emphasis, GenerateRequest, InitImage, LongPrompt,
    MimicGuidance, RngKind, SeedMode, Subseed,
};
pub use source::ModelSource;
pub use textual_inversion::LoadedEmbedding;
