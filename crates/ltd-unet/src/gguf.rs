//! The U-Net with quantized weights as a GGUF file (ggml's container, which
//! stable-diffusion.cpp reads and writes): the weights [`UNet2DConditionModel::quantize`]
//! quantizes stored in the format, every other tensor in the precision it has in the folder
//! (f32, f16 or bf16), under diffusers' key names, with
//! the format's name in the metadata key [`QUANTIZATION_KEY`]. The architecture stays in the
//! model folder's `unet/config.json`.
//!
//! Loading dequantizes to f32, builds the model and quantizes the same layers again; for Q8_0
//! this gives back the stored blocks exactly (a dequantized block's largest weight is ±127
//! times its scale, so the scale and every rounded weight come out the same), so a U-Net loaded
//! from the file computes what the one quantized at load computed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use ltd_nn::{Error, Quantization, QuantizeReport, RuntimeOptions, SafetensorsFiles};

use crate::{UNet2DConditionModel, UNetConfig};

/// The metadata key holding the quantization's name (`q8_0`).
pub const QUANTIZATION_KEY: &str = "ltd.quantization";

/// Whether [`UNet2DConditionModel::quantize`] quantizes the tensor `name` of these dims: the
/// 2-D weights of the transformer blocks and of linear `proj_in`/`proj_out`, where they split
/// into whole blocks.
pub fn is_quantized(name: &str, dims: &[usize], q: Quantization) -> bool {
    let linear = name.contains(".transformer_blocks.")
        || name.ends_with(".proj_in.weight")
        || name.ends_with(".proj_out.weight");
    linear && name.ends_with(".weight") && q.fits(dims)
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Writes the U-Net weights in `files` (a diffusers `unet/` folder's) to `path`, quantizing
/// the tensors [`is_quantized`] names.
pub fn save(
    files: &SafetensorsFiles,
    q: Quantization,
    path: &Path,
) -> ltd_nn::Result<QuantizeReport> {
    let mut names: Vec<&str> = files.names();
    names.sort_unstable();
    let mut report = QuantizeReport::default();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = files.load(name, DType::F32, &Device::Cpu)?;
        let qt = if is_quantized(name, t.dims(), q) {
            let qt = QTensor::quantize(&t, q.ggml_dtype())?;
            report.add(QuantizeReport {
                tensors: 1,
                bytes_before: t.elem_count() * 4,
                bytes_after: qt.storage_size_in_bytes(),
            });
            qt
        } else {
            // Other tensors keep the precision they have in the folder (f16 files stay f16).
            let keep = match files.dtype(name) {
                Some(DType::F16) => GgmlDType::F16,
                Some(DType::BF16) => GgmlDType::BF16,
                _ => GgmlDType::F32,
            };
            QTensor::quantize(&t, keep)?
        };
        tensors.push((name.to_string(), qt));
    }
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let value = gguf_file::Value::String(q.name().to_string());
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| io_error(path, e))?);
    gguf_file::write(&mut file, &[(QUANTIZATION_KEY, &value)], &refs)?;
    std::io::Write::flush(&mut file).map_err(|e| io_error(path, e))?;
    Ok(report)
}

/// Loads a U-Net of architecture `cfg` from a file [`save`] wrote, quantized as it was saved.
pub fn load(
    path: &Path,
    cfg: &UNetConfig,
    device: &Device,
    opts: &RuntimeOptions,
) -> ltd_nn::Result<UNet2DConditionModel> {
    let bad = |message: String| Error::msg(format!("{}: {message}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let content =
        gguf_file::Content::read(&mut file).map_err(|e| bad(format!("not a GGUF file ({e})")))?;
    let q = match content.metadata.get(QUANTIZATION_KEY) {
        Some(gguf_file::Value::String(name)) => {
            name.parse::<Quantization>().map_err(|e| bad(e.to_string()))?
        }
        _ => return Err(bad(format!("no `{QUANTIZATION_KEY}` metadata: not a U-Net ltd saved"))),
    };
    let mut weights = HashMap::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu)?.dequantize(device)?;
        weights.insert(name.clone(), t);
    }
    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
    let mut unet = UNet2DConditionModel::new(vb, cfg, opts).map_err(|e| bad(e.to_string()))?;
    unet.quantize(q)?;
    Ok(unet)
}
