//! Hugging Face "imagefolder" datasets: a folder of images plus `metadata.jsonl`, one
//! `{"file_name": …, "text": …}` object per line (further fields are ignored).
//!
//! Images are decoded once, resized so that the shorter side is the training resolution
//! (bilinear, as diffusers' training scripts' `transforms.Resize`), centre-cropped to a square
//! and kept in memory as bytes (`N × resolution² × 3`); batches are converted to `[-1, 1]`
//! on demand, mirrored when random flipping is on. Unreadable lines and images are skipped and
//! counted, never fatal; a dataset with nothing usable is an error.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;

use crate::error::{Result, TrainError};

/// The metadata file of an imagefolder.
pub const METADATA: &str = "metadata.jsonl";

/// One usable example.
#[derive(Debug, Clone)]
pub struct Example {
    /// The image file, relative to the dataset folder.
    pub file_name: String,
    /// The caption.
    pub text: String,
}

/// Why something was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `metadata.jsonl:LINE` or the image path.
    pub what: String,
    /// The reason.
    pub reason: String,
}

/// An imagefolder loaded at one resolution.
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    resolution: usize,
    examples: Vec<Example>,
    /// `resolution² × 3` bytes per example, rows top to bottom.
    pixels: Vec<Vec<u8>>,
    skipped_lines: Vec<Skipped>,
    skipped_images: Vec<Skipped>,
}

/// The fields of a metadata line we use (everything else is ignored).
#[derive(serde::Deserialize)]
struct Line {
    file_name: String,
    text: String,
}

impl ImageFolder {
    /// Reads `root/metadata.jsonl` and every image it names, at `resolution` pixels.
    pub fn open(root: &Path, resolution: usize) -> Result<Self> {
        if resolution == 0 {
            return Err(TrainError::option("resolution", "must be positive"));
        }
        if !root.is_dir() {
            return Err(TrainError::dataset(root, "no such folder"));
        }
        let meta = root.join(METADATA);
        if !meta.is_file() {
            return Err(TrainError::dataset(
                root,
                format!(
                    "no {METADATA}: expected a Hugging Face imagefolder, images plus one \
                     {{\"file_name\": …, \"text\": …}} object per line of {METADATA}"
                ),
            ));
        }
        let text = std::fs::read_to_string(&meta).map_err(|e| TrainError::io(&meta, e))?;
        let mut out = Self {
            root: root.to_path_buf(),
            resolution,
            examples: Vec::new(),
            pixels: Vec::new(),
            skipped_lines: Vec::new(),
            skipped_images: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let what = format!("{METADATA}:{}", n + 1);
            let parsed: Line = match serde_json::from_str(line) {
                Ok(l) => l,
                Err(e) => {
                    out.skipped_lines.push(Skipped { what, reason: e.to_string() });
                    continue;
                }
            };
            let path = root.join(&parsed.file_name);
            match load_image(&path, resolution) {
                Ok(px) => {
                    out.examples.push(Example { file_name: parsed.file_name, text: parsed.text });
                    out.pixels.push(px);
                }
                Err(reason) => {
                    out.skipped_images.push(Skipped { what: path.display().to_string(), reason })
                }
            }
        }
        for s in out.skipped_lines.iter().chain(&out.skipped_images).take(10) {
            tracing::warn!("skipped {}: {}", s.what, s.reason);
        }
        if out.skipped_lines.len() + out.skipped_images.len() > 0 {
            tracing::warn!(
                "skipped {} unreadable metadata lines and {} unreadable images in {}",
                out.skipped_lines.len(),
                out.skipped_images.len(),
                root.display()
            );
        }
        if out.examples.is_empty() {
            return Err(TrainError::dataset(
                root,
                format!(
                    "no usable examples ({} metadata lines and {} images skipped)",
                    out.skipped_lines.len(),
                    out.skipped_images.len()
                ),
            ));
        }
        Ok(out)
    }

    /// The dataset folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The side of every image.
    pub fn resolution(&self) -> usize {
        self.resolution
    }

    /// Number of usable examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are none (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The usable examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Skipped metadata lines.
    pub fn skipped_lines(&self) -> &[Skipped] {
        &self.skipped_lines
    }

    /// Skipped images.
    pub fn skipped_images(&self) -> &[Skipped] {
        &self.skipped_images
    }

    /// Example `i` as an RGB image (after resizing and cropping).
    pub fn image(&self, i: usize) -> Option<RgbImage> {
        let r = self.resolution as u32;
        RgbImage::from_raw(r, r, self.pixels.get(i)?.clone())
    }

    /// `[B, 3, R, R]` f32 in `[-1, 1]` (`2 * byte / 255 - 1`) for `indices`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let plain = vec![Augment::default(); indices.len()];
        self.batch_augmented(indices, &plain, self.resolution, device)
    }

    /// `[B, 3, S, S]` f32 in `[-1, 1]` for `indices`, example `b` cropped and mirrored as
    /// `augments[b]` says (crops are `size`² squares at the given corner).
    pub fn batch_augmented(
        &self,
        indices: &[usize],
        augments: &[Augment],
        size: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let data = self.batch_pixels(indices, augments, size)?;
        Ok(Tensor::from_vec(data, (indices.len(), 3, size, size), device)?)
    }

    /// [`Self::batch_augmented`]'s values on the host, row-major `[B, 3, S, S]` (for work that
    /// needs the pixels as well as the tensor, without copying the tensor back).
    pub fn batch_pixels(
        &self,
        indices: &[usize],
        augments: &[Augment],
        size: usize,
    ) -> Result<Vec<f32>> {
        let r = self.resolution;
        if size > r || augments.len() != indices.len() {
            return Err(TrainError::msg(format!(
                "internal: batch of {} examples with {} augmentations at size {size} (images are {r})",
                indices.len(),
                augments.len()
            )));
        }
        let plane = size * size;
        let mut data = vec![0f32; indices.len() * 3 * plane];
        for (b, (&i, aug)) in indices.iter().zip(augments).enumerate() {
            let px = self.pixels.get(i).ok_or_else(|| {
                TrainError::msg(format!("example {i} out of range ({} examples)", self.len()))
            })?;
            let (x0, y0) = (aug.x0.min(r - size), aug.y0.min(r - size));
            let out = &mut data[b * 3 * plane..(b + 1) * 3 * plane];
            for y in 0..size {
                for x in 0..size {
                    let sx = if aug.flip { x0 + size - 1 - x } else { x0 + x };
                    let p = &px[((y0 + y) * r + sx) * 3..((y0 + y) * r + sx) * 3 + 3];
                    for c in 0..3 {
                        out[c * plane + y * size + x] = 2.0 * (p[c] as f32 / 255.0) - 1.0;
                    }
                }
            }
        }
        Ok(data)
    }
}

/// How one example of a batch is cropped and mirrored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Augment {
    /// Mirror left–right (after cropping).
    pub flip: bool,
    /// Left column of the crop.
    pub x0: usize,
    /// Top row of the crop.
    pub y0: usize,
}

/// Decodes `path` and brings it to `resolution`² RGB bytes; errors are phrased for a warning.
fn load_image(path: &Path, resolution: usize) -> std::result::Result<Vec<u8>, String> {
    let img = image::open(path).map_err(|e| e.to_string())?.to_rgb8();
    Ok(resize_center_crop(&img, resolution).into_raw())
}

/// Resizes so that the shorter side is `res` (bilinear), then crops the centre square.
/// Images already `res`² are returned unchanged.
pub fn resize_center_crop(img: &RgbImage, res: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == res && h == res {
        return img.clone();
    }
    let scale = res as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as usize).max(res),
        ((h as f64 * scale).round() as usize).max(res),
    );
    let resized = image::imageops::resize(img, nw as u32, nh as u32, FilterType::Triangle);
    // torchvision's CenterCrop rounds the offsets: int(round((size - crop) / 2)).
    let left = ((nw - res) as f64 / 2.0).round() as u32;
    let top = ((nh - res) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(&resized, left, top, res as u32, res as u32).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_and_crop_keep_the_centre() {
        // A 40×20 image whose middle 20×20 is red and the sides blue.
        let mut img = RgbImage::from_pixel(40, 20, image::Rgb([0, 0, 255]));
        for y in 0..20 {
            for x in 10..30 {
                img.put_pixel(x, y, image::Rgb([255, 0, 0]));
            }
        }
        let out = resize_center_crop(&img, 10);
        assert_eq!(out.dimensions(), (10, 10));
        assert_eq!(out.get_pixel(5, 5).0, [255, 0, 0]);
        // The crop's edge column sits next to the blue sides: bilinear filtering bleeds a little.
        let edge = out.get_pixel(0, 0).0;
        assert!(edge[0] > 200 && edge[2] < 60, "{edge:?}");
        let same = resize_center_crop(&out, 10);
        assert_eq!(same.as_raw(), out.as_raw());
    }
}
