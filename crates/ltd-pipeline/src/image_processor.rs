//! The pixel operations of diffusers' `VaeImageProcessor` that inpainting uses, ported from
//! the PIL code they call so that the bytes come out the same: Lanczos resizing (PIL's
//! `Resample.c`: separable, coefficients in f64 rounded to 22-bit fixed point, horizontal pass
//! first, 8-bit intermediate), `GaussianBlur` (PIL's three-pass extended box blur, Gwosdek et
//! al. 2011), grayscale conversion (ITU-R 601 luma in 16-bit fixed point), `get_crop_region`,
//! the `fill` and `crop` resize modes, and `apply_overlay`'s masked paste and alpha
//! composite. Plus what ltd adds on top: the outpainting canvas.
//!
//! Images are interleaved 8-bit [`Bitmap`]s with 1 (mask) or 3 (RGB) channels.

use crate::error::{PipelineError, Result};
use crate::image::RgbImage;

/// An 8-bit image with `channels` interleaved channels, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grayscale, PIL's "L") or 3 (RGB).
    pub channels: usize,
    /// `width * height * channels` bytes.
    pub data: Vec<u8>,
}

impl Bitmap {
    /// A black image.
    pub fn new(width: usize, height: usize, channels: usize) -> Self {
        Self { width, height, channels, data: vec![0; width * height * channels] }
    }

    /// The pixels of an RGB image.
    pub fn from_rgb(img: &RgbImage) -> Self {
        Self { width: img.width, height: img.height, channels: 3, data: img.pixels.clone() }
    }

    /// As an RGB image (a grayscale one with its value in all three channels, as PIL's
    /// `convert("RGB")`).
    pub fn to_rgb(&self) -> RgbImage {
        let pixels = match self.channels {
            3 => self.data.clone(),
            _ => self.data.iter().flat_map(|&v| [v, v, v]).collect(),
        };
        RgbImage { width: self.width, height: self.height, pixels }
    }

    /// PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16`.
    pub fn to_luma(&self) -> Bitmap {
        if self.channels == 1 {
            return self.clone();
        }
        let data = self
            .data
            .chunks_exact(3)
            .map(|p| {
                ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16)
                    as u8
            })
            .collect();
        Bitmap { width: self.width, height: self.height, channels: 1, data }
    }

    fn px(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }

    /// PIL's `crop`: the box `(x1, y1, x2, y2)`, black where it leaves the image.
    pub fn crop(&self, (x1, y1, x2, y2): (i64, i64, i64, i64)) -> Bitmap {
        let (w, h) = ((x2 - x1).max(0) as usize, (y2 - y1).max(0) as usize);
        let mut out = Bitmap::new(w, h, self.channels);
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = (x as i64 + x1, y as i64 + y1);
                if (0..self.width as i64).contains(&sx) && (0..self.height as i64).contains(&sy) {
                    let c = self.channels;
                    let o = (y * w + x) * c;
                    out.data[o..o + c].copy_from_slice(self.px(sx as usize, sy as usize));
                }
            }
        }
        out
    }

    /// PIL's `paste(src, (x, y))` without a mask, clipped to this image.
    pub fn paste(&mut self, src: &Bitmap, x0: i64, y0: i64) {
        let src = if src.channels == self.channels { src.clone() } else { src.to_channels(self) };
        for y in 0..src.height {
            for x in 0..src.width {
                let (dx, dy) = (x as i64 + x0, y as i64 + y0);
                if (0..self.width as i64).contains(&dx) && (0..self.height as i64).contains(&dy) {
                    let c = self.channels;
                    let o = (dy as usize * self.width + dx as usize) * c;
                    self.data[o..o + c].copy_from_slice(src.px(x, y));
                }
            }
        }
    }

    fn to_channels(&self, like: &Bitmap) -> Bitmap {
        match like.channels {
            1 => self.to_luma(),
            _ => Bitmap::from_rgb(&self.to_rgb()),
        }
    }

    /// PIL's `resize((width, height), LANCZOS, box)`: `box` is the source region
    /// `(x1, y1, x2, y2)` in (fractional) pixels, the whole image when `None`.
    pub fn resize(&self, width: usize, height: usize, bbox: Option<[f64; 4]>) -> Bitmap {
        self.resample(width, height, bbox, Filter::Lanczos)
    }

    /// PIL's `resize` with the given filter.
    fn resample(
        &self,
        width: usize,
        height: usize,
        bbox: Option<[f64; 4]>,
        filter: Filter,
    ) -> Bitmap {
        let bbox = bbox.unwrap_or([0.0, 0.0, self.width as f64, self.height as f64]);
        let whole = bbox == [0.0, 0.0, self.width as f64, self.height as f64];
        if (width, height) == (self.width, self.height) && whole {
            return self.clone();
        }
        let need_h = width != self.width || bbox[0] != 0.0 || bbox[2] != width as f64;
        let need_v = height != self.height || bbox[1] != 0.0 || bbox[3] != height as f64;
        let horiz = Coeffs::new(self.width, bbox[0], bbox[2], width, filter);
        let vert = Coeffs::new(self.height, bbox[1], bbox[3], height, filter);
        let c = self.channels;
        let mut img = self.clone();
        if need_h {
            let mut out = Bitmap::new(width, self.height, c);
            for y in 0..self.height {
                for x in 0..width {
                    let (start, k) = horiz.row(x);
                    for ch in 0..c {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, &w) in k.iter().enumerate() {
                            ss += img.data[(y * self.width + start + i) * c + ch] as i64 * w;
                        }
                        out.data[(y * width + x) * c + ch] = clip8(ss);
                    }
                }
            }
            img = out;
        }
        if need_v {
            let w = img.width;
            let mut out = Bitmap::new(w, height, c);
            for y in 0..height {
                let (start, k) = vert.row(y);
                for x in 0..w {
                    for ch in 0..c {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, &kw) in k.iter().enumerate() {
                            ss += img.data[((start + i) * w + x) * c + ch] as i64 * kw;
                        }
                        out.data[(y * w + x) * c + ch] = clip8(ss);
                    }
                }
            }
            img = out;
        }
        img
    }

    /// diffusers' `VaeImageProcessor._resize_and_fill`: fits the image inside
    /// `width × height` keeping its aspect ratio, centred, and fills the two empty bands by
    /// stretching the image's outermost rows (or columns) — with PIL's default bicubic filter
    /// there, as diffusers calls `resize` without a filter for them.
    pub fn resize_and_fill(&self, width: usize, height: usize) -> Bitmap {
        let ratio = width as f64 / height as f64;
        let src_ratio = self.width as f64 / self.height as f64;
        let src_w = if ratio < src_ratio { width } else { self.width * height / self.height };
        let src_h = if ratio >= src_ratio { height } else { self.height * width / self.width };
        let resized = self.resize(src_w, src_h, None);
        let mut res = Bitmap::new(width, height, 3);
        let offset = |a: usize, b: usize| (a / 2) as i64 - (b / 2) as i64;
        res.paste(&resized, offset(width, src_w), offset(height, src_h));
        let (rw, rh) = (resized.width as f64, resized.height as f64);
        if ratio < src_ratio {
            let fill = offset(height, src_h);
            if fill > 0 {
                let f = fill as usize;
                let top = resized.resample(
                    width,
                    f,
                    Some([0.0, 0.0, width as f64, 0.0]),
                    Filter::Bicubic,
                );
                res.paste(&top, 0, 0);
                let bottom =
                    resized.resample(width, f, Some([0.0, rh, width as f64, rh]), Filter::Bicubic);
                res.paste(&bottom, 0, fill + src_h as i64);
            }
        } else if ratio > src_ratio {
            let fill = offset(width, src_w);
            if fill > 0 {
                let f = fill as usize;
                let left = resized.resample(
                    f,
                    height,
                    Some([0.0, 0.0, 0.0, height as f64]),
                    Filter::Bicubic,
                );
                res.paste(&left, 0, 0);
                let right = resized.resample(
                    f,
                    height,
                    Some([rw, 0.0, rw, height as f64]),
                    Filter::Bicubic,
                );
                res.paste(&right, fill + src_w as i64, 0);
            }
        }
        if self.channels == 1 {
            res.to_luma()
        } else {
            res
        }
    }

    /// diffusers' `VaeImageProcessor._resize_and_crop`: covers `width × height` keeping the
    /// aspect ratio, centred, the excess cut off.
    pub fn resize_and_crop(&self, width: usize, height: usize) -> Bitmap {
        let ratio = width as f64 / height as f64;
        let src_ratio = self.width as f64 / self.height as f64;
        let src_w = if ratio > src_ratio { width } else { self.width * height / self.height };
        let src_h = if ratio <= src_ratio { height } else { self.height * width / self.width };
        let resized = self.resize(src_w, src_h, None);
        let mut res = Bitmap::new(width, height, self.channels);
        res.paste(
            &resized,
            (width / 2) as i64 - (src_w / 2) as i64,
            (height / 2) as i64 - (src_h / 2) as i64,
        );
        res
    }

    /// PIL's `ImageFilter.GaussianBlur(radius)` (diffusers' `VaeImageProcessor.blur`): three
    /// passes of an extended box blur per direction, edges repeated.
    pub fn gaussian_blur(&self, radius: f32) -> Bitmap {
        if radius == 0.0 {
            return self.clone();
        }
        let box_radius = gaussian_blur_radius(radius, 3);
        let mut img = self.clone();
        let (w, h, c) = (self.width, self.height, self.channels);
        for _ in 0..3 {
            for y in 0..h {
                for ch in 0..c {
                    let line: Vec<u8> = (0..w).map(|x| img.data[(y * w + x) * c + ch]).collect();
                    for (x, v) in box_blur_line(&line, box_radius).into_iter().enumerate() {
                        img.data[(y * w + x) * c + ch] = v;
                    }
                }
            }
        }
        for _ in 0..3 {
            for x in 0..w {
                for ch in 0..c {
                    let line: Vec<u8> = (0..h).map(|y| img.data[(y * w + x) * c + ch]).collect();
                    for (y, v) in box_blur_line(&line, box_radius).into_iter().enumerate() {
                        img.data[(y * w + x) * c + ch] = v;
                    }
                }
            }
        }
        img
    }
}

/// Bits of fraction in PIL's 8-bit resampling coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// The PIL resampling filters diffusers uses.
#[derive(Debug, Clone, Copy)]
enum Filter {
    /// Truncated sinc, support 3 (`Image.LANCZOS`, diffusers' `resample`).
    Lanczos,
    /// Keys' cubic convolution with a = −0.5, support 2 (PIL's default).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Lanczos => 3.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Lanczos if (-3.0..3.0).contains(&x) => sinc(x) * sinc(x / 3.0),
            Self::Lanczos => 0.0,
            Self::Bicubic => {
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// One direction's fixed-point coefficients (PIL's `precompute_coeffs` and
/// `normalize_coeffs_8bpc`): for each output pixel the first input pixel and the weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    kk: Vec<i64>,
}

impl Coeffs {
    fn new(in_size: usize, in0: f64, in1: f64, out_size: usize, filter: Filter) -> Self {
        let scale = (in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut kk = vec![0i64; out_size * ksize];
        for xx in 0..out_size {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates towards zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin as i64;
            let xmax = xmax.max(0) as usize;
            let k: Vec<f64> = (0..xmax)
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            for (x, &w) in k.iter().enumerate() {
                let w = if ww != 0.0 { w / ww } else { w };
                let scaled = w * (1u64 << PRECISION_BITS) as f64;
                kk[xx * ksize + x] =
                    if w < 0.0 { (-0.5 + scaled) as i64 } else { (0.5 + scaled) as i64 };
            }
            bounds.push((xmin, xmax));
        }
        Self { bounds, ksize, kk }
    }

    fn row(&self, i: usize) -> (usize, &[i64]) {
        let (start, n) = self.bounds[i];
        (start, &self.kk[i * self.ksize..i * self.ksize + n])
    }
}

/// PIL's `_gaussian_blur_radius`: the extended box radius whose `passes` passes have the
/// Gaussian's variance (in single precision, as PIL computes it).
fn gaussian_blur_radius(radius: f32, passes: u32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One pass of PIL's extended box blur over a line: the `2r + 1` nearest pixels at full
/// weight and the next two at the fractional weight, in 24-bit fixed point, edges repeated.
fn box_blur_line(line: &[u8], radius: f32) -> Vec<u8> {
    let r = radius as i64;
    let ww = (16_777_216f32 / (radius * 2.0 + 1.0)) as u64;
    let fw = ((1u64 << 24) - (r as u64 * 2 + 1) * ww) / 2;
    let last = line.len() as i64 - 1;
    let at = |i: i64| line[i.clamp(0, last) as usize] as u64;
    (0..=last)
        .map(|x| {
            let acc: u64 = (x - r..=x + r).map(at).sum();
            let bulk = acc * ww + (at(x - r - 1) + at(x + r + 1)) * fw;
            ((bulk + (1 << 23)) >> 24) as u8
        })
        .collect()
}

/// diffusers' `VaeImageProcessor.get_crop_region`: the bounding box of the mask's non-black
/// pixels, padded by `pad`, then widened (or heightened) to the `width:height` aspect ratio
/// and shifted back inside the image. `(x1, y1, x2, y2)`; an error for an all-black mask.
pub fn get_crop_region(
    mask: &Bitmap,
    width: usize,
    height: usize,
    pad: usize,
) -> Result<(i64, i64, i64, i64)> {
    let m = mask.to_luma();
    let (w, h) = (m.width as i64, m.height as i64);
    let col = |x: i64| (0..h).any(|y| m.data[(y * w + x) as usize] != 0);
    let row = |y: i64| (0..w).any(|x| m.data[(y * w + x) as usize] != 0);
    let Some(left) = (0..w).find(|&x| col(x)) else {
        return Err(PipelineError::invalid(
            "padding-mask-crop",
            "the mask is all black: there is no region to crop to",
        ));
    };
    let right = (0..w).rev().find(|&x| col(x)).unwrap_or(left);
    let top = (0..h).find(|&y| row(y)).unwrap_or(0);
    let bottom = (0..h).rev().find(|&y| row(y)).unwrap_or(top);
    let pad = pad as i64;
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + 1 + pad).min(w), (bottom + 1 + pad).min(h));
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = width as f64 / height as f64;
    if ratio_crop > ratio {
        let desired = (x2 - x1) as f64 / ratio;
        let diff = (desired - (y2 - y1) as f64) as i64;
        y1 -= diff.div_euclid(2);
        y2 += diff - diff.div_euclid(2);
        if y2 >= h {
            let d = y2 - h;
            y2 -= d;
            y1 -= d;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        y2 = y2.min(h);
    } else {
        let desired = (y2 - y1) as f64 * ratio;
        let diff = (desired - (x2 - x1) as f64) as i64;
        x1 -= diff.div_euclid(2);
        x2 += diff - diff.div_euclid(2);
        if x2 >= w {
            let d = x2 - w;
            x2 -= d;
            x1 -= d;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        x2 = x2.min(w);
    }
    Ok((x1, y1, x2, y2))
}

/// `(x · y + 128) / 255` rounded as PIL's `DIV255`.
fn div255(v: u32) -> u32 {
    let t = v + 128;
    ((t >> 8) + t) >> 8
}

/// diffusers' `VaeImageProcessor.apply_overlay`: pastes the generated `image` (resized into
/// `crop` first, when given) under the original `init` wherever `mask` is black, blending
/// through its grays, exactly as PIL's premultiplied paste and `alpha_composite` round.
pub fn apply_overlay(
    mask: &Bitmap,
    init: &Bitmap,
    image: &Bitmap,
    crop: Option<(i64, i64, i64, i64)>,
) -> Result<Bitmap> {
    let (w, h) = (init.width, init.height);
    let mask = mask.to_luma();
    if (mask.width, mask.height) != (w, h) {
        return Err(PipelineError::msg(format!(
            "the mask is {}x{} but the image is {w}x{h}",
            mask.width, mask.height
        )));
    }
    let image = match crop {
        Some((x1, y1, x2, y2)) => {
            let resized = image.resize_and_crop((x2 - x1) as usize, (y2 - y1) as usize);
            let mut base = Bitmap::new(w, h, 3);
            base.paste(&resized, x1, y1);
            base
        }
        None => image.clone(),
    };
    if (image.width, image.height) != (w, h) {
        return Err(PipelineError::msg(format!(
            "the generated image is {}x{} but the original is {w}x{h}",
            image.width, image.height
        )));
    }
    let init = Bitmap::from_rgb(&init.to_rgb());
    let mut out = Bitmap::new(w, h, 3);
    for i in 0..w * h {
        // The original, premultiplied by the inverted mask, then un-premultiplied (RGBa → RGBA).
        let a = 255 - mask.data[i] as u32;
        let px = i * 3..i * 3 + 3;
        let (orig, gen) = (&init.data[px.clone()], &image.data[px.clone()]);
        for ((o, &s), &d) in out.data[px].iter_mut().zip(orig).zip(gen) {
            let p = div255(s as u32 * a);
            let src = if a == 255 || a == 0 { p } else { ((255 * p) / a).min(255) };
            let dst = d as u32;
            *o = if a == 0 {
                dst as u8
            } else {
                // PIL's `ImagingAlphaComposite` over an opaque destination, 7 extra bits.
                let outa255 = a * 255 + 255 * (255 - a);
                let coef1 = a * 255 * 255 * (1 << 7) / outa255;
                let coef2 = 255 * (1 << 7) - coef1;
                let t = src * coef1 + dst * coef2 + (0x80 << 7);
                ((((t >> 8) + t) >> 8) >> 7) as u8
            };
        }
    }
    Ok(out)
}

/// What `--outpaint` puts in the new area of the canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutpaintFill {
    /// The picture's outermost pixels repeated outwards (NumPy's `pad(mode="edge")`): the
    /// new area starts from the colours at the border, which a 4-channel model's partial
    /// denoising (`--strength` < 1) continues rather than fights.
    #[default]
    Edge,
}

/// The outpainting canvas: `image` extended by `(left, right, top, bottom)` pixels, the new
/// area filled by `fill`, and the inpainting mask, white exactly on the new area.
pub fn outpaint_canvas(
    image: &RgbImage,
    [left, right, top, bottom]: [usize; 4],
    fill: OutpaintFill,
) -> (RgbImage, RgbImage) {
    let OutpaintFill::Edge = fill;
    let (w, h) = (image.width + left + right, image.height + top + bottom);
    let mut canvas = vec![0u8; w * h * 3];
    let mut mask = vec![255u8; w * h * 3];
    for y in 0..h {
        let sy = y.saturating_sub(top).min(image.height - 1);
        for x in 0..w {
            let sx = x.saturating_sub(left).min(image.width - 1);
            let (o, s) = ((y * w + x) * 3, (sy * image.width + sx) * 3);
            canvas[o..o + 3].copy_from_slice(&image.pixels[s..s + 3]);
            if (top..top + image.height).contains(&y) && (left..left + image.width).contains(&x) {
                mask[o..o + 3].fill(0);
            }
        }
    }
    (
        RgbImage { width: w, height: h, pixels: canvas },
        RgbImage { width: w, height: h, pixels: mask },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb(w: usize, h: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> RgbImage {
        let pixels = (0..h * w).flat_map(|i| f(i % w, i / w)).collect();
        RgbImage { width: w, height: h, pixels }
    }

    #[test]
    fn outpaint_extends_the_canvas_and_masks_only_the_new_area() {
        let img = rgb(3, 2, |x, y| [x as u8 * 10 + 5, y as u8 * 10 + 5, 7]);
        let (canvas, mask) = outpaint_canvas(&img, [1, 2, 0, 1], OutpaintFill::Edge);
        assert_eq!((canvas.width, canvas.height), (6, 3));
        let at = |im: &RgbImage, x: usize, y: usize| im.pixels[(y * im.width + x) * 3];
        // Original pixels sit at (left, top); the new columns repeat the edge pixels.
        assert_eq!((0..6).map(|x| at(&canvas, x, 0)).collect::<Vec<_>>(), [5, 5, 15, 25, 25, 25]);
        assert_eq!(canvas.pixels[(2 * 6) * 3 + 1], 15, "the new bottom row repeats row 1");
        let m: Vec<u8> = (0..3)
            .flat_map(|y| (0..6).map(move |x| (x, y)))
            .map(|(x, y)| at(&mask, x, y))
            .collect();
        assert_eq!(
            m,
            [255, 0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255]
        );
    }

    #[test]
    fn blur_radius_matches_pil() {
        // PIL: ImageFilter.GaussianBlur(r) → ImagingBoxBlur with these radii (3 passes).
        // σ² = 1/3: L = √5, l = 0, a = −1 / (6 · (1/3 − 1)) = 0.25.
        assert!((gaussian_blur_radius(1.0, 3) - 0.25).abs() < 1e-6);
        let flat = box_blur_line(&[9; 5], 2.3);
        assert_eq!(flat, [9; 5]);
    }
}
