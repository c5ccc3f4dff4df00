//! Text-to-image and image-to-image generation with Stable Diffusion 1.x, 2.x and XL models
//! in diffusers layout: model folders (local or from the hub), prompt encoding,
//! classifier-free guidance, the denoising loop and decoding.
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
pub mod image;
pub mod model_index;
pub mod params;
pub mod pipeline;
pub mod request;
pub mod single_file;
pub mod source;
mod text;

pub use error::{PipelineError, Result};
pub use generate::{GeneratedImage, Generation, Progress, Timings};
pub use image::RgbImage;
pub use ltd_scheduler::SamplerKind;
pub use model_index::{ModelIndex, PipelineKind};
pub use params::GenerationParams;
pub use pipeline::{LoadOptions, Pipeline};
pub use request::{
    parse_sampler, DynamicThreshold, GenerateRequest, InitImage, LongPrompt, MimicGuidance, RngKind,
};
pub use source::ModelSource;
