//! Pixels in and out, converted exactly as diffusers' `VaeImageProcessor` does, so that a
//! decoded tensor becomes the same bytes diffusers writes. Reading and writing image files is
//! the caller's business (the CLI); this crate sees RGB buffers only.

use candle_core::{DType, Device, Tensor};

use crate::error::{PipelineError, Result};

/// An 8-bit RGB image, rows top to bottom, pixels left to right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Wraps a buffer, checking its length.
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        if pixels.len() != width * height * 3 {
            return Err(PipelineError::msg(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                pixels.len()
            )));
        }
        Ok(Self { width, height, pixels })
    }

    /// `[1, 3, H, W]` in [-1, 1]: `2 * (byte / 255) - 1` in f32, as diffusers' preprocess.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (w, h) = (self.width, self.height);
        let mut planar = vec![0f32; 3 * w * h];
        for (i, px) in self.pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planar[c * w * h + i] = 2.0 * (px[c] as f32 / 255.0) - 1.0;
            }
        }
        Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
    }
}

/// Decoded images `[B, 3, H, W]` in [-1, 1] to bytes, as diffusers' postprocess to PIL:
/// `(x * 0.5 + 0.5).clamp(0, 1)`, then `(v * 255).round()` with NumPy's round-half-to-even.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(PipelineError::msg(format!("decoded images have {c} channels, expected 3")));
    }
    let v = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let v = ((v * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
    let data = v.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(b);
    for n in 0..b {
        let mut pixels = vec![0u8; h * w * 3];
        for ch in 0..3 {
            let plane = &data[(n * 3 + ch) * h * w..(n * 3 + ch + 1) * h * w];
            for (i, &val) in plane.iter().enumerate() {
                pixels[i * 3 + ch] = (val * 255.0).round_ties_even() as u8;
            }
        }
        out.push(RgbImage { width: w, height: h, pixels });
    }
    Ok(out)
}

/// PSNR in dB between two images of the same size (`inf` when identical).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Option<f64> {
    if (a.width, a.height) != (b.width, b.height) {
        return None;
    }
    let mse =
        a.pixels.iter().zip(&b.pixels).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>()
            / a.pixels.len() as f64;
    Some(if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64.powi(2) / mse).log10() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounds_like_numpy() {
        let img = RgbImage::new(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let t = img.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 1, 2]);
        assert_eq!(tensor_to_images(&t).unwrap()[0], img);
        // 0.5 * 255 = 127.5 rounds to even (128); -1 and values past 1 clamp.
        let t = Tensor::new(&[[[[0f32, -2.0, 3.0]]; 3]], &Device::Cpu).unwrap();
        assert_eq!(tensor_to_images(&t).unwrap()[0].pixels[..3], [128, 128, 128]);
        assert_eq!(tensor_to_images(&t).unwrap()[0].pixels[3..6], [0, 0, 0]);
        assert!(RgbImage::new(2, 2, vec![0; 3]).is_err());
    }
}
