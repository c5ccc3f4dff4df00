//! Image bytes in and out: PNG encoding with the generation parameters in a `parameters`
//! text chunk in AUTOMATIC1111's format, and decoding of the pictures users hand in (PNG,
//! JPEG, WebP, BMP). Shared by `ltd-gen` (files) and `ltd-serve` (base64 in JSON), so both
//! give the same bytes for the same image.

use anyhow::{anyhow, Result};
use ltd_pipeline::RgbImage;

/// Encodes `image` as a PNG with `parameters` as its `parameters` text.
pub fn encode_png(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // PIL (and so A1111) writes tEXt when the text is Latin-1 and iTXt (UTF-8) otherwise.
    if parameters.chars().all(|c| (c as u32) < 256) {
        enc.add_text_chunk("parameters".into(), parameters.into())?;
    } else {
        enc.add_itxt_chunk("parameters".into(), parameters.into())?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(&image.pixels)?;
    writer.finish()?;
    Ok(bytes)
}

/// Decodes a picture (any format the `image` crate reads here) into RGB bytes; `what` names
/// it in the error (`--init-image x.png`, `init_images[0]`).
pub fn decode_image(bytes: &[u8], what: &str) -> Result<RgbImage> {
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| anyhow!("{what}: cannot read ({e})"))?
        .decode()
        .map_err(|e| anyhow!("{what}: not a readable image ({e})"))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(RgbImage::new(w as usize, h as usize, img.into_raw())?)
}

/// A seed when none is given: different on every call, recorded in the PNG.
pub fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // SplitMix64 of time, pid and a call counter (a server draws many in one nanosecond),
    // kept below 2^32 so it is easy to retype.
    let calls = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut z =
        nanos ^ ((std::process::id() as u64) << 32) ^ calls.wrapping_mul(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    (z ^ (z >> 31)) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_it_encodes_and_names_bad_input() {
        let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let png = encode_png(&img, "a cat").unwrap();
        assert_eq!(decode_image(&png, "x").unwrap(), img);
        let e = decode_image(b"not an image", "init_images[0]").unwrap_err().to_string();
        assert!(e.starts_with("init_images[0]: "), "{e}");
    }

    #[test]
    fn random_seeds_differ_between_calls() {
        let seeds: std::collections::BTreeSet<u64> = (0..100).map(|_| random_seed()).collect();
        assert_eq!(seeds.len(), 100);
        assert!(seeds.iter().all(|&s| s < 1 << 32));
    }
}
