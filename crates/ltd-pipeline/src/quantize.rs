//! Quantized U-Net weights for a pipeline (`--quantize`, `--save-quantized-unet`,
//! `--quantized-unet`): the U-Net's transformer linear layers in ggml's Q8_0 (see
//! `ltd_unet::gguf` for which layers and the file), everything else as loaded.

use std::path::Path;

use ltd_nn::{Quantization, QuantizeReport, RuntimeOptions, SafetensorsFiles};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};

use crate::{LoadOptions, Pipeline, PipelineError, Result};

/// Loads the U-Net of the model folder `unet_dir` (its `config.json`) from the GGUF file `path`
/// that [`Pipeline::save_quantized_unet`] wrote.
pub(crate) fn load_unet(
    path: &Path,
    unet_dir: &Path,
    options: &LoadOptions,
    runtime: &RuntimeOptions,
) -> Result<UNet2DConditionModel> {
    if !options.loras.is_empty() {
        return Err(PipelineError::msg(
            "--quantized-unet: LoRAs cannot be merged into a quantized U-Net file; merge them \
             before saving it",
        ));
    }
    let cfg: UNetConfig = ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(
        &unet_dir.join("config.json"),
    )?;
    Ok(ltd_unet::gguf::load(path, &cfg, &options.device, runtime)?)
}

impl Pipeline {
    /// Quantizes the U-Net's transformer linear layers in place (`--quantize`).
    pub fn quantize_unet(&mut self, q: Quantization) -> Result<QuantizeReport> {
        match &mut self.unet {
            crate::pipeline::UNetSlot::Loaded(unet) => Ok(unet.quantize(q)?),
            // Refused at load (`deepfloyd::check_load_options`): no such layers.
            crate::pipeline::UNetSlot::OnDemand(_) => Err(PipelineError::msg(format!(
                "--quantize: {} loads its U-Net for each image (DeepFloyd IF), which has no \
                 layers that q8_0 quantizes",
                self.name
            ))),
        }
    }

    /// Writes the model folder's U-Net weights to `path` as GGUF with the layers
    /// [`Pipeline::quantize_unet`] quantizes in `q` (`--save-quantized-unet`). Needs a diffusers
    /// folder (the file keeps diffusers' key names, read from `unet/`).
    pub fn save_quantized_unet(&self, q: Quantization, path: &Path) -> Result<QuantizeReport> {
        let dir = self.root.join("unet");
        if self.model_hash.is_some() || !dir.join("config.json").is_file() {
            return Err(PipelineError::msg(
                "--save-quantized-unet needs a diffusers model folder (not a single-file \
                 checkpoint)",
            ));
        }
        let files = ltd_nn::weights::component_weights(&dir, &["diffusion_pytorch_model"], None)?;
        let files = SafetensorsFiles::open(&files)?;
        Ok(ltd_unet::gguf::save(&files, q, path)?)
    }
}
