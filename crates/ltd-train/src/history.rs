//! The loss history: one JSON object per step in `loss.jsonl`, and a loss-curve PNG.
//!
//! On resume the log is cut back to the checkpoint's step, so lines written by the killed run
//! after its last checkpoint do not appear twice.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// 1-based step.
    pub step: usize,
    /// The total loss.
    pub loss: f32,
    /// The learning rate used.
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// Named loss terms (reconstruction, KL, …) and per-step diagnostics (the U-Net's mean
    /// timestep).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terms: Vec<(String, f32)>,
}

/// The history file of a run.
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    records: Vec<Record>,
}

impl History {
    /// Starts a new history at `path` (replacing any file there).
    pub fn create(path: &Path) -> Result<Self> {
        write_atomic(path, b"")?;
        Ok(Self { path: path.to_path_buf(), records: Vec::new() })
    }

    /// Re-opens the history of a run resumed at `step`, dropping later lines.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TrainError::io(path, e)),
        };
        let mut records = Vec::new();
        let mut kept = String::new();
        for line in text.lines() {
            // A line cut short by the kill is simply dropped.
            let Ok(r) = serde_json::from_str::<Record>(line) else { continue };
            if r.step <= step {
                kept.push_str(line);
                kept.push('\n');
                records.push(r);
            }
        }
        write_atomic(path, kept.as_bytes())?;
        Ok(Self { path: path.to_path_buf(), records })
    }

    /// Appends a record to the file and the memory.
    pub fn push(&mut self, record: Record) -> Result<()> {
        let mut line =
            serde_json::to_string(&record).map_err(|e| TrainError::msg(e.to_string()))?;
        line.push('\n');
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| TrainError::io(&self.path, e))?;
        f.write_all(line.as_bytes()).map_err(|e| TrainError::io(&self.path, e))?;
        self.records.push(record);
        Ok(())
    }

    /// All records so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Mean loss of the last `n` records.
    pub fn recent_mean(&self, n: usize) -> Option<f32> {
        let tail = &self.records[self.records.len().saturating_sub(n)..];
        (!tail.is_empty()).then(|| tail.iter().map(|r| r.loss).sum::<f32>() / tail.len() as f32)
    }

    /// Draws the loss curve into `path`.
    pub fn plot(&self, path: &Path) -> Result<()> {
        let pts: Vec<(f64, f64)> =
            self.records.iter().map(|r| (r.step as f64, r.loss as f64)).collect();
        let img = plot_log_curve(&pts, 720, 400);
        img.save(path).map_err(|source| TrainError::Image { path: path.to_path_buf(), source })
    }
}

const MARGIN_L: u32 = 70;
const MARGIN_R: u32 = 16;
const MARGIN_T: u32 = 16;
const MARGIN_B: u32 = 34;

/// A line chart of `points` (x, y > 0) with a log₁₀ y axis: raw values in light grey, an
/// exponential moving average in blue, decade grid lines and labelled axes.
pub fn plot_log_curve(points: &[(f64, f64)], width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> =
        points.iter().copied().filter(|(_, y)| y.is_finite() && *y > 0.0).collect();
    let (pw, ph) = (width - MARGIN_L - MARGIN_R, height - MARGIN_T - MARGIN_B);
    let axis = Rgb([0, 0, 0]);
    line(&mut img, MARGIN_L, MARGIN_T, MARGIN_L, MARGIN_T + ph, axis);
    line(&mut img, MARGIN_L, MARGIN_T + ph, MARGIN_L + pw, MARGIN_T + ph, axis);
    if pts.is_empty() {
        return img;
    }
    let x_max = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let ly: Vec<f64> = pts.iter().map(|p| p.1.log10()).collect();
    let mut lo = ly.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let mut hi = ly.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil();
    if hi <= lo {
        (lo, hi) = (lo - 1.0, hi + 1.0);
    }
    let to_px = |x: f64, l: f64| {
        let px = MARGIN_L as f64 + x / x_max * pw as f64;
        let py = MARGIN_T as f64 + (hi - l) / (hi - lo) * ph as f64;
        (px.round() as i64, py.round() as i64)
    };
    let mut decade = lo;
    while decade <= hi {
        let (_, y) = to_px(0.0, decade);
        for x in (MARGIN_L + 1..MARGIN_L + pw).step_by(4) {
            put(&mut img, x as i64, y, Rgb([200, 200, 200]));
        }
        let label = format!("1e{}", decade as i64);
        text(&mut img, 6, y - 5, &label, axis);
        decade += 1.0;
    }
    for frac in [0.0, 0.5, 1.0] {
        let x = frac * x_max;
        let (px, _) = to_px(x, lo);
        line(&mut img, px as u32, MARGIN_T + ph, px as u32, MARGIN_T + ph + 4, axis);
        let label = format!("{}", x.round() as i64);
        let w = label.len() as i64 * 8;
        text(&mut img, (px - w / 2).max(0), (MARGIN_T + ph + 10) as i64, &label, axis);
    }
    let mut prev: Option<(i64, i64)> = None;
    for (p, l) in pts.iter().zip(&ly) {
        let q = to_px(p.0, *l);
        if let Some(a) = prev {
            line_i(&mut img, a, q, Rgb([190, 190, 190]));
        }
        prev = Some(q);
    }
    let alpha = 2.0 / (pts.len().min(200) as f64 / 10.0 + 1.0).max(2.0);
    let mut smooth = ly[0];
    let mut prev: Option<(i64, i64)> = None;
    for (p, l) in pts.iter().zip(&ly) {
        smooth += alpha * (l - smooth);
        let q = to_px(p.0, smooth);
        if let Some(a) = prev {
            line_i(&mut img, a, q, Rgb([20, 60, 220]));
        }
        prev = Some(q);
    }
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, c: Rgb<u8>) {
    line_i(img, (x0 as i64, y0 as i64), (x1 as i64, y1 as i64), c);
}

/// Bresenham's line.
fn line_i(img: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// 3×5 glyphs for axis labels, one row per `u8` (bit 2 = left column).
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

/// Draws `s` with its top-left corner at `(x, y)`, glyphs doubled in size.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(img, x + i as i64 * 8 + col * 2 + ox, y + row as i64 * 2 + oy, c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_cuts_the_log_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.jsonl");
        let mut h = History::create(&path).unwrap();
        for step in 1..=6 {
            h.push(Record { step, loss: step as f32, lr: 1e-3, grad_norm: 1.0, terms: vec![] })
                .unwrap();
        }
        // A half-written line from the kill.
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + "{\"step\": 7, \"lo")
            .unwrap();
        let h = History::resume(&path, 4).unwrap();
        assert_eq!(h.records().len(), 4);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
        assert_eq!(h.recent_mean(2), Some(3.5));
    }

    #[test]
    fn plots_something_in_the_frame() {
        let pts: Vec<(f64, f64)> = (1..100).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let img = plot_log_curve(&pts, 320, 200);
        let blue = img.pixels().filter(|p| p.0 == [20, 60, 220]).count();
        assert!(blue > 100, "{blue}");
        assert_eq!(plot_log_curve(&[], 320, 200).dimensions(), (320, 200));
    }
}
