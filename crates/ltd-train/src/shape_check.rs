//! An analytic checker for make-shapes images: what colour, shape and position does a
//! generated image show?
//!
//! 1. The background colour is the per-channel median of the border pixels, named by the
//!    nearest [`PALETTE`] colour.
//! 2. Every pixel far enough from the background is named by its nearest palette colour; the
//!    most frequent name is the shape's colour ("dominant non-background colour").
//! 3. The largest 4-connected blob of that colour is the shape: its centroid, in thirds of the
//!    image, gives the position; the shape is the ideal circle, square or triangle fitted to the
//!    blob's bounding box that overlaps it best (intersection over union).

use image::RgbImage;
use serde::Serialize;

use crate::images::border_median;
use crate::shapes::{Attributes, Position, ShapeKind, PALETTE};

/// A pixel must be at least this far (Euclidean RGB) from the background to be foreground.
const FOREGROUND_DISTANCE: f64 = 60.0;
/// A foreground pixel is only named if a palette colour is this close; anti-aliased edges and
/// mixtures stay unnamed.
const NAMING_DISTANCE: f64 = 90.0;
/// Blobs smaller than this fraction of the image are noise, not a shape.
const MIN_BLOB_FRACTION: f64 = 0.004;

/// What the checker sees in an image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// The background's palette name.
    pub background: &'static str,
    /// The dominant foreground colour, if there is a foreground.
    pub colour: Option<&'static str>,
    /// The best-fitting shape, if a blob was found.
    pub shape: Option<ShapeKind>,
    /// The blob's position, if a blob was found.
    pub position: Option<Position>,
    /// The blob's area divided by its bounding box's (1 square, π/4 circle, ½ triangle).
    pub fill_ratio: f64,
    /// The blob's area in pixels.
    pub area: usize,
}

fn dist(a: [u8; 3], b: [u8; 3]) -> f64 {
    let d = |i: usize| a[i] as f64 - b[i] as f64;
    (d(0).powi(2) + d(1).powi(2) + d(2).powi(2)).sqrt()
}

/// The nearest palette colour and its distance.
fn nearest(c: [u8; 3]) -> (usize, f64) {
    PALETTE
        .iter()
        .enumerate()
        .map(|(i, (_, p))| (i, dist(c, *p)))
        .fold((0, f64::INFINITY), |best, x| if x.1 < best.1 { x } else { best })
}

/// Looks at one image.
pub fn analyze(img: &RgbImage) -> Detection {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0;
    let bg = |c: usize| border_median(w, h, |p| px(p % w, p / w)[c]).unwrap_or(0);
    let bg_rgb = [bg(0), bg(1), bg(2)];
    let bg_index = nearest(bg_rgb).0;
    let background = PALETTE[bg_index].0;

    // Name the foreground pixels; each votes for its name with weight `1 - d / NAMING_DISTANCE`,
    // so pure pixels outvote the blends of anti-aliased edges.
    let mut labels = vec![usize::MAX; w * h];
    let mut votes = vec![0f64; PALETTE.len()];
    for y in 0..h {
        for x in 0..w {
            let c = px(x, y);
            if dist(c, bg_rgb) < FOREGROUND_DISTANCE {
                continue;
            }
            let (i, d) = nearest(c);
            if d <= NAMING_DISTANCE && i != bg_index {
                labels[y * w + x] = i;
                votes[i] += 1.0 - d / NAMING_DISTANCE;
            }
        }
    }
    let empty = Detection {
        background,
        colour: None,
        shape: None,
        position: None,
        fill_ratio: 0.0,
        area: 0,
    };
    let Some((dominant, &best)) = votes.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)) else {
        return empty;
    };
    if best <= 0.0 {
        return empty;
    }
    let colour = Some(PALETTE[dominant].0);
    let fg_rgb = PALETTE[dominant].1;
    let blob = largest_blob(&labels, w, h, dominant);
    if (blob.len() as f64) < MIN_BLOB_FRACTION * (w * h) as f64 {
        return Detection { colour, ..empty };
    }
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &i in &blob {
        let (x, y) = (i % w, i / w);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    let fill_ratio = blob.len() as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    // Soft coverage of the shape colour over the background in the blob's box grown by two
    // pixels, so that anti-aliased edges count by the fraction they cover.
    let (rx0, ry0) = (x0.saturating_sub(2), y0.saturating_sub(2));
    let (rx1, ry1) = ((x1 + 2).min(w - 1), (y1 + 2).min(h - 1));
    let axis: Vec<f64> = (0..3).map(|c| fg_rgb[c] as f64 - bg_rgb[c] as f64).collect();
    let norm2 = axis.iter().map(|a| a * a).sum::<f64>().max(1.0);
    let mut cover = Coverage { x0: rx0, y0: ry0, w: rx1 - rx0 + 1, t: Vec::new() };
    for y in ry0..=ry1 {
        for x in rx0..=rx1 {
            let p = px(x, y);
            let dot: f64 = (0..3).map(|c| (p[c] as f64 - bg_rgb[c] as f64) * axis[c]).sum();
            cover.t.push((dot / norm2).clamp(0.0, 1.0));
        }
    }
    let Some(m) = cover.moments() else { return Detection { colour, ..empty } };
    // The best-fitting ideal shape; its box centre (not the centroid, which sits low in a
    // triangle) gives the position.
    let (kind, _, (bx, by)) = ShapeKind::ALL
        .into_iter()
        .map(|k| {
            let (iou, centre) = cover.fit(k, &m);
            (k, iou, centre)
        })
        .fold(
            (ShapeKind::Circle, -1.0, (m.cx, m.cy)),
            |best, x| if x.1 > best.1 { x } else { best },
        );
    let third = |v: f64, n: usize| ((3.0 * v / n as f64).floor() as i64).clamp(0, 2) as u8;
    let position = Some(Position { col: third(bx, w), row: third(by, h) });
    let shape = Some(kind);
    Detection { background, colour, shape, position, fill_ratio, area: blob.len() }
}

/// Soft coverage (0–1) of the shape colour over a rectangle of the image.
struct Coverage {
    x0: usize,
    y0: usize,
    w: usize,
    t: Vec<f64>,
}

/// Centroid and central second moments of a coverage map (pixel units).
struct Moments {
    cx: f64,
    cy: f64,
    var_x: f64,
    var_y: f64,
}

impl Coverage {
    /// `(x, y, coverage)` of every pixel centre.
    fn cells(&self) -> impl Iterator<Item = (f64, f64, f64)> + '_ {
        self.t.iter().enumerate().map(|(i, &t)| {
            ((self.x0 + i % self.w) as f64 + 0.5, (self.y0 + i / self.w) as f64 + 0.5, t)
        })
    }

    fn moments(&self) -> Option<Moments> {
        let area: f64 = self.t.iter().sum();
        if area <= 0.0 {
            return None;
        }
        let cx = self.cells().map(|(x, _, t)| x * t).sum::<f64>() / area;
        let cy = self.cells().map(|(_, y, t)| y * t).sum::<f64>() / area;
        let var_x = self.cells().map(|(x, _, t)| (x - cx).powi(2) * t).sum::<f64>() / area;
        let var_y = self.cells().map(|(_, y, t)| (y - cy).powi(2) * t).sum::<f64>() / area;
        Some(Moments { cx, cy, var_x, var_y })
    }

    /// Soft intersection over union with the ideal `kind` whose box is fitted to the moments,
    /// and that box's centre:
    /// a uniform shape of width `W` has `var_x = W²/12` (square), `W²/16` (disc) or `W²/24`
    /// (triangle, height `H` with `var_y = H²/18`, centroid a sixth of `H` below the box centre).
    fn fit(&self, kind: ShapeKind, m: &Moments) -> (f64, (f64, f64)) {
        const SS: usize = 4;
        let (kx, ky, dy) = match kind {
            ShapeKind::Square => (12.0, 12.0, 0.0),
            ShapeKind::Circle => (16.0, 16.0, 0.0),
            ShapeKind::Triangle => (24.0, 18.0, 1.0 / 6.0),
        };
        let (half_w, half_h) = ((kx * m.var_x).sqrt() / 2.0, (ky * m.var_y).sqrt() / 2.0);
        if half_w <= 0.0 || half_h <= 0.0 {
            return (0.0, (m.cx, m.cy));
        }
        let (cx, cy) = (m.cx, m.cy - dy * 2.0 * half_h);
        let (mut inter, mut union) = (0.0, 0.0);
        for (x, y, t) in self.cells() {
            let mut hits = 0usize;
            for sy in 0..SS {
                for sx in 0..SS {
                    let u = (x - 0.5 + (sx as f64 + 0.5) / SS as f64 - cx) / half_w;
                    let v = (y - 0.5 + (sy as f64 + 0.5) / SS as f64 - cy) / half_h;
                    hits += kind.contains(u, v) as usize;
                }
            }
            let ideal = hits as f64 / (SS * SS) as f64;
            inter += t.min(ideal);
            union += t.max(ideal);
        }
        (if union > 0.0 { inter / union } else { 0.0 }, (cx, cy))
    }
}

/// Indices of the largest 4-connected set of pixels labelled `label`.
fn largest_blob(labels: &[usize], w: usize, h: usize, label: usize) -> Vec<usize> {
    let mut seen = vec![false; labels.len()];
    let mut best = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || labels[start] != label {
            continue;
        }
        let mut blob = vec![start];
        seen[start] = true;
        let mut k = 0;
        while k < blob.len() {
            let i = blob[k];
            k += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == label {
                    seen[j] = true;
                    blob.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if blob.len() > best.len() {
            best = blob;
        }
    }
    best
}

/// How one image compares with what was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Verdict {
    /// The colour is right.
    pub colour: bool,
    /// The shape is right.
    pub shape: bool,
    /// The position is right.
    pub position: bool,
    /// The background is right.
    pub background: bool,
}

impl Verdict {
    /// Compares a detection with the prompt's attributes.
    pub fn judge(d: &Detection, want: &Attributes) -> Self {
        Self {
            colour: d.colour == Some(want.colour.as_str()),
            shape: d.shape == Some(want.shape),
            position: d.position == Some(want.position),
            background: d.background == want.background,
        }
    }

    /// Everything is right.
    pub fn all(&self) -> bool {
        self.colour && self.shape && self.position && self.background
    }
}

/// Accuracies over many verdicts, as fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Accuracy {
    /// Number of images.
    pub n: usize,
    /// Colour accuracy.
    pub colour: f64,
    /// Shape accuracy.
    pub shape: f64,
    /// Position accuracy.
    pub position: f64,
    /// Background accuracy.
    pub background: f64,
    /// Fraction with everything right.
    pub all: f64,
}

impl Accuracy {
    /// Aggregates verdicts.
    pub fn of(verdicts: &[Verdict]) -> Self {
        let n = verdicts.len();
        let frac = |f: &dyn Fn(&Verdict) -> bool| {
            if n == 0 {
                0.0
            } else {
                verdicts.iter().filter(|v| f(v)).count() as f64 / n as f64
            }
        };
        Self {
            n,
            colour: frac(&|v| v.colour),
            shape: frac(&|v| v.shape),
            position: frac(&|v| v.position),
            background: frac(&|v| v.background),
            all: frac(&|v| v.all()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::shapes::{all_attributes, render, render_at, SizeKind};

    /// Every attribute combination, rendered with jitter, is read back exactly.
    #[test]
    fn reads_every_combination_back() {
        for size in [32usize, 64] {
            let mut rng = Rng::new(5);
            for a in all_attributes() {
                let img = render(&a, size, &mut rng);
                let d = analyze(&img);
                let v = Verdict::judge(&d, &a);
                assert!(v.all(), "{size}px {a:?}: {d:?}");
            }
        }
    }

    #[test]
    fn fill_ratios_match_the_geometry() {
        let base = |shape| Attributes {
            shape,
            colour: "red".into(),
            size: SizeKind::Large,
            position: Position { col: 1, row: 1 },
            background: "white".into(),
        };
        // Ideal ratios 1, π/4 ≈ 0.785, 1/2; pixelisation at a 40 px box moves them by < 0.05.
        for (shape, ratio) in
            [(ShapeKind::Square, 1.0), (ShapeKind::Circle, 0.785), (ShapeKind::Triangle, 0.5)]
        {
            let d = analyze(&render_at(&base(shape), 64, 32.0, 32.0, 20.0));
            assert!((d.fill_ratio - ratio).abs() < 0.05, "{shape:?}: {}", d.fill_ratio);
        }
    }

    #[test]
    fn blank_and_noisy_images_have_no_shape() {
        let blank = RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]));
        let d = analyze(&blank);
        assert_eq!((d.background, d.colour, d.shape), ("gray", None, None));
        let mut speck = blank.clone();
        speck.put_pixel(10, 10, image::Rgb([220, 30, 30]));
        let d = analyze(&speck);
        assert_eq!((d.colour, d.shape, d.position), (Some("red"), None, None));
        let v = Verdict::judge(&d, &all_attributes()[0]);
        assert!(!v.shape && !v.position);
    }

    #[test]
    fn accuracy_aggregates() {
        let t = Verdict { colour: true, shape: true, position: true, background: true };
        let f = Verdict { colour: true, shape: false, position: true, background: true };
        let acc = Accuracy::of(&[t, f, f, t]);
        assert_eq!((acc.n, acc.colour, acc.shape, acc.all), (4, 1.0, 0.5, 0.5));
        assert_eq!(Accuracy::of(&[]).n, 0);
    }
}
