//! Tensors to pictures: decoded batches to RGB images (as diffusers' postprocessing rounds
//! them), image grids for previews, PSNR, and the background colour of plain-background images.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};

/// The upper median of `value(p)` over the border pixels of a `w`×`h` image (`p` is the
/// row-major pixel index): the background of a plain-background image, which objects touching
/// the border do not move. `None` for an empty image.
pub fn border_median<T: Copy + PartialOrd>(
    w: usize,
    h: usize,
    value: impl Fn(usize) -> T,
) -> Option<T> {
    let mut border: Vec<T> = (0..w * h)
        .filter(|p| p % w == 0 || p % w == w - 1 || p / w == 0 || p / w == h - 1)
        .map(value)
        .collect();
    border.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    border.get(border.len() / 2).copied()
}

/// `[B, 3, H, W]` in [-1, 1] to images: `(x / 2 + 0.5).clamp(0, 1) · 255`, rounded half to
/// even as NumPy does in diffusers' `numpy_to_pil`.
pub fn to_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(TrainError::msg(format!("images have {c} channels, expected 3")));
    }
    let v = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..b)
        .map(|n| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let i = y as usize * w + x as usize;
                let px = |ch: usize| {
                    let val = (v[(n * 3 + ch) * plane + i] * 0.5 + 0.5).clamp(0.0, 1.0);
                    (val * 255.0).round_ties_even() as u8
                };
                Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

/// Lays out rows of equally sized images with `pad` grey pixels between them.
pub fn grid(rows: &[Vec<RgbImage>], pad: u32) -> RgbImage {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let (w, h) = rows.iter().flatten().next().map(|i| i.dimensions()).unwrap_or((1, 1));
    let mut out = RgbImage::from_pixel(
        cols * (w + pad) + pad,
        rows.len() as u32 * (h + pad) + pad,
        Rgb([96, 96, 96]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let (x0, y0) = (pad + c as u32 * (w + pad), pad + r as u32 * (h + pad));
            image::imageops::replace(&mut out, img, x0 as i64, y0 as i64);
        }
    }
    out
}

/// Saves an image, creating its folder.
pub fn save(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    img.save(path).map_err(|source| TrainError::Image { path: path.to_path_buf(), source })
}

/// Peak signal-to-noise ratio in dB of two images of the same size (`inf` when identical).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1) as f64;
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_median_ignores_the_interior_and_an_object_on_the_edge() {
        // 5×5: an object (7) fills the 3×3 interior, another (9) touches the edge at two
        // pixels; the other 14 border pixels are background (1). Counting the interior would
        // make the median 7.
        let v = |p: usize| {
            let (x, y) = (p % 5, p / 5);
            if (1..4).contains(&x) && (1..4).contains(&y) {
                7
            } else if p == 2 || p == 3 {
                9
            } else {
                1
            }
        };
        assert_eq!(border_median(5, 5, v), Some(1));
        assert_eq!(border_median(0, 0, v), None);
    }

    #[test]
    fn converts_and_measures() {
        let t =
            Tensor::new(&[[[[-1f32, 0.0]], [[1.0, 2.0]], [[0.5, -3.0]]]], &Device::Cpu).unwrap();
        let imgs = to_images(&t).unwrap();
        // 0 → 127.5 rounds to even 128; 0.5 → 191.25 → 191.
        assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 255, 191]);
        assert_eq!(imgs[0].get_pixel(1, 0).0, [128, 255, 0]);
        assert!(psnr(&imgs[0], &imgs[0]).is_infinite());
        let mut other = imgs[0].clone();
        other.get_pixel_mut(0, 0).0[0] = 10;
        // MSE = 100 / 6 → 10·log10(65025·6/100) ≈ 35.91 dB.
        assert!((psnr(&imgs[0], &other) - 35.912).abs() < 1e-3);
        let g = grid(&[imgs.clone(), imgs], 2);
        // One 2x1 image per row: 2 + pad on each side; two rows of height 1.
        assert_eq!(g.dimensions(), (6, 8));
    }
}
