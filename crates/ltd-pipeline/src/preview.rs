//! Previews of a generation in progress: the first image of the batch decoded from the
//! latents a step callback sees ([`crate::Progress::latents`]).
//!
//! Nothing is computed unless a front end asks: the callback hands out the latents by
//! reference, so a server that shows no preview costs no decode and no copy to the host.
//! The preview is the VAE's decode of the current noisy latents (A1111's "Full" live preview
//! of `x_t`), so early steps look like noise and later ones converge on the final image; at
//! the last step it equals the generated image.

use candle_core::Tensor;

use crate::error::{PipelineError, Result};
use crate::image::RgbImage;
use crate::pipeline::Pipeline;

impl Pipeline {
    /// Decodes the first image of `latents` (`[N, C, h, w]`, the diffusion model's scale).
    pub fn preview(&self, latents: &Tensor) -> Result<RgbImage> {
        let first = latents.narrow(0, 0, 1)?;
        self.decode_latents(&first, false)?
            .into_iter()
            .next()
            .ok_or_else(|| PipelineError::msg("preview: the latents hold no image"))
    }
}
