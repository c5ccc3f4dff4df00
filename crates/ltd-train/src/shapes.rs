//! make-shapes: a deterministic synthetic captioned dataset of flat shapes.
//!
//! Every image shows one shape (circle, square, triangle) of one colour and size at one of
//! nine positions on a plain background, captioned in plain English ("a small red circle in
//! the top left on a blue background"). Size and position phrases are sometimes left out of
//! the caption, so that short prompts such as "a red circle on a blue background" are in the
//! training distribution. The attributes are also written as extra fields of
//! `metadata.jsonl` (which the imagefolder reader ignores), and `shapes.json` records the spec,
//! so that evaluation knows what was held out.
//!
//! Hold-out rules name attribute combinations that are never generated (`colour=red,
//! shape=circle`): evaluation then prompts for exactly those combinations to measure whether a
//! model composes attributes it has only seen apart.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::rng::{derive_seed, Rng};

/// The name of the spec file written next to `metadata.jsonl`.
pub const SPEC_FILE: &str = "shapes.json";

/// Named colours, shared by shapes and backgrounds (RGB chosen to be far apart).
pub const PALETTE: &[(&str, [u8; 3])] = &[
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 70, 230]),
    ("yellow", [245, 215, 30]),
    ("purple", [140, 50, 190]),
    ("orange", [245, 130, 20]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
    ("gray", [128, 128, 128]),
];

/// Colours a shape can have.
pub const SHAPE_COLOURS: &[&str] = &["red", "green", "blue", "yellow", "purple", "orange"];

/// Colours a background can have.
pub const BACKGROUNDS: &[&str] = &["white", "black", "gray", "blue"];

/// The RGB value of a palette colour.
pub fn rgb_of(name: &str) -> Option<[u8; 3]> {
    PALETTE.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// A shape kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    /// A filled disc.
    Circle,
    /// An axis-aligned filled square.
    Square,
    /// A filled triangle pointing up.
    Triangle,
}

impl ShapeKind {
    /// All kinds.
    pub const ALL: [Self; 3] = [Self::Circle, Self::Square, Self::Triangle];

    /// The English word.
    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
        }
    }

    /// Whether the point `(x, y)`, in units of the shape's half-extent around its centre, is
    /// inside the shape. The shape fills the box `[-1, 1]²` (the triangle's apex is at the top
    /// and its base at the bottom edge).
    pub fn contains(self, x: f64, y: f64) -> bool {
        match self {
            Self::Circle => x * x + y * y <= 1.0,
            Self::Square => x.abs() <= 1.0 && y.abs() <= 1.0,
            // Apex (0, -1), base from (-1, 1) to (1, 1): |x| <= (y + 1) / 2.
            Self::Triangle => (-1.0..=1.0).contains(&y) && x.abs() <= (y + 1.0) / 2.0,
        }
    }
}

/// A shape's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SizeKind {
    /// About a quarter of the image wide.
    Small,
    /// About two fifths of the image wide.
    Large,
}

impl SizeKind {
    /// All sizes.
    pub const ALL: [Self; 2] = [Self::Small, Self::Large];

    /// The English word.
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Large => "large",
        }
    }

    /// Half-extent as a fraction of the image side.
    fn half_extent(self) -> f64 {
        match self {
            Self::Small => 0.12,
            Self::Large => 0.20,
        }
    }
}

/// One of nine positions on a 3×3 grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Column: 0 left, 1 centre, 2 right.
    pub col: u8,
    /// Row: 0 top, 1 middle, 2 bottom.
    pub row: u8,
}

impl Position {
    /// All nine positions, row by row.
    pub fn all() -> Vec<Self> {
        (0..3).flat_map(|row| (0..3).map(move |col| Self { col, row })).collect()
    }

    /// The short name (`top left`, `top`, `center`, …).
    pub fn name(self) -> &'static str {
        const NAMES: [[&str; 3]; 3] = [
            ["top left", "top", "top right"],
            ["left", "center", "right"],
            ["bottom left", "bottom", "bottom right"],
        ];
        NAMES[self.row as usize % 3][self.col as usize % 3]
    }

    /// The phrase used in captions ("in the top left", "at the top", "on the left", …).
    pub fn phrase(self) -> String {
        let name = self.name();
        match (self.col, self.row) {
            (1, 0) | (1, 2) => format!("at the {name}"),
            (0, 1) | (2, 1) => format!("on the {name}"),
            _ => format!("in the {name}"),
        }
    }

    /// The position whose short name is `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|p| p.name() == name)
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_name(&s).ok_or_else(|| serde::de::Error::custom(format!("no position `{s}`")))
    }
}

/// Everything that defines one image up to jitter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attributes {
    /// The shape.
    pub shape: ShapeKind,
    /// The shape's colour (a [`PALETTE`] name).
    pub colour: String,
    /// The size.
    pub size: SizeKind,
    /// The position.
    pub position: Position,
    /// The background colour (a [`PALETTE`] name).
    pub background: String,
}

/// Which attribute a hold-out condition is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    /// [`Attributes::shape`].
    Shape,
    /// [`Attributes::colour`].
    Colour,
    /// [`Attributes::size`].
    Size,
    /// [`Attributes::position`].
    Position,
    /// [`Attributes::background`].
    Background,
}

impl Attribute {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "shape" => Self::Shape,
            "colour" | "color" => Self::Colour,
            "size" => Self::Size,
            "position" => Self::Position,
            "background" => Self::Background,
            _ => return None,
        })
    }

    /// The value of this attribute in `a`, as spelled in captions and rules.
    pub fn value_of(self, a: &Attributes) -> &str {
        match self {
            Self::Shape => a.shape.name(),
            Self::Colour => &a.colour,
            Self::Size => a.size.name(),
            Self::Position => a.position.name(),
            Self::Background => &a.background,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Shape => "shape",
            Self::Colour => "colour",
            Self::Size => "size",
            Self::Position => "position",
            Self::Background => "background",
        }
    }

    /// Every value the generator uses for this attribute.
    fn values(self) -> Vec<&'static str> {
        match self {
            Self::Shape => ShapeKind::ALL.iter().map(|s| s.name()).collect(),
            Self::Colour => SHAPE_COLOURS.to_vec(),
            Self::Size => SizeKind::ALL.iter().map(|s| s.name()).collect(),
            Self::Position => Position::all().into_iter().map(Position::name).collect(),
            Self::Background => BACKGROUNDS.to_vec(),
        }
    }
}

/// A conjunction of attribute values never generated for training
/// (`colour=red,shape=circle`; serialised as that string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldoutRule(pub Vec<(Attribute, String)>);

impl Serialize for HoldoutRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HoldoutRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl HoldoutRule {
    /// Whether `a` matches every condition.
    pub fn matches(&self, a: &Attributes) -> bool {
        self.0.iter().all(|(attr, v)| attr.value_of(a) == v)
    }
}

impl FromStr for HoldoutRule {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |m: String| TrainError::option("holdout", format!("`{s}`: {m}"));
        let mut conds = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) =
                part.split_once('=').ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            let attr = Attribute::parse(k.trim()).ok_or_else(|| {
                bad(format!("unknown attribute `{k}` (shape, colour, size, position, background)"))
            })?;
            let v = v.trim().replace(['-', '_'], " ");
            let values = attr.values();
            if !values.contains(&v.as_str()) {
                return Err(bad(format!("{} `{v}` is not one of {values:?}", attr.name())));
            }
            conds.push((attr, v));
        }
        if conds.is_empty() {
            return Err(bad("no conditions".into()));
        }
        Ok(Self(conds))
    }
}

impl fmt::Display for HoldoutRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(a, v)| format!("{}={v}", a.name())).collect();
        write!(f, "{}", parts.join(","))
    }
}

/// What `make-shapes` generates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapesSpec {
    /// Number of images.
    pub count: usize,
    /// Image side in pixels.
    pub size: usize,
    /// The seed: the same spec always gives the same files.
    pub seed: u64,
    /// Combinations never generated.
    #[serde(default)]
    pub holdout: Vec<HoldoutRule>,
    /// Probability that a caption leaves out the size word.
    #[serde(default = "default_omit")]
    pub omit_size: f64,
    /// Probability that a caption leaves out the position phrase.
    #[serde(default = "default_omit")]
    pub omit_position: f64,
}

fn default_omit() -> f64 {
    0.25
}

impl ShapesSpec {
    /// A spec with the default caption variation and no hold-out.
    pub fn new(count: usize, size: usize, seed: u64) -> Self {
        Self {
            count,
            size,
            seed,
            holdout: Vec::new(),
            omit_size: default_omit(),
            omit_position: default_omit(),
        }
    }

    /// Whether `a` is held out.
    pub fn is_held_out(&self, a: &Attributes) -> bool {
        self.holdout.iter().any(|r| r.matches(a))
    }

    fn check(&self) -> Result<()> {
        if self.size < 16 {
            return Err(TrainError::option("size", format!("{} is below 16 pixels", self.size)));
        }
        if !(0.0..=1.0).contains(&self.omit_size) || !(0.0..=1.0).contains(&self.omit_position) {
            return Err(TrainError::option("omit", "probabilities must be in [0, 1]"));
        }
        if all_attributes().iter().all(|a| self.is_held_out(a)) {
            return Err(TrainError::option("holdout", "the rules hold out every combination"));
        }
        Ok(())
    }
}

/// Every combination of attributes the generator can draw (shape colour ≠ background).
pub fn all_attributes() -> Vec<Attributes> {
    let mut out = Vec::new();
    for shape in ShapeKind::ALL {
        for colour in SHAPE_COLOURS {
            for size in SizeKind::ALL {
                for position in Position::all() {
                    for bg in BACKGROUNDS.iter().filter(|b| *b != colour) {
                        out.push(Attributes {
                            shape,
                            colour: colour.to_string(),
                            size,
                            position,
                            background: bg.to_string(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// One generated sample.
#[derive(Debug, Clone)]
pub struct ShapeSample {
    /// The attributes.
    pub attributes: Attributes,
    /// The caption.
    pub caption: String,
    /// The image.
    pub image: RgbImage,
}

/// The full caption of `a` ("a small red circle in the top left on a blue background").
pub fn caption(a: &Attributes) -> String {
    caption_with(a, true, true)
}

/// A caption with or without the size word and the position phrase.
pub fn caption_with(a: &Attributes, size: bool, position: bool) -> String {
    let mut words = Vec::new();
    if size {
        words.push(a.size.name().to_string());
    }
    words.push(a.colour.clone());
    words.push(a.shape.name().to_string());
    if position {
        words.push(a.position.phrase());
    }
    let article = if words[0].starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    let bg = &a.background;
    let bg_article = if bg.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {} on {bg_article} {bg} background", words.join(" "))
}

/// Draws the attributes of image `index` (skipping held-out combinations).
fn draw_attributes(spec: &ShapesSpec, rng: &mut Rng) -> Attributes {
    loop {
        let colour = rng.choose(SHAPE_COLOURS).to_string();
        let backgrounds: Vec<&&str> = BACKGROUNDS.iter().filter(|b| **b != colour).collect();
        let a = Attributes {
            shape: *rng.choose(&ShapeKind::ALL),
            colour,
            size: *rng.choose(&SizeKind::ALL),
            position: *rng.choose(&Position::all()),
            background: rng.choose(&backgrounds).to_string(),
        };
        // `check` guarantees a non-held-out combination exists; with the default attribute
        // sets any rule set that passes it leaves a good share of them.
        if !spec.is_held_out(&a) {
            return a;
        }
    }
}

/// Renders one image of `a` at `size` pixels with `rng` for the jitter of position and size.
pub fn render(a: &Attributes, size: usize, rng: &mut Rng) -> RgbImage {
    let s = size as f64;
    let half = a.size.half_extent() * s * rng.uniform_in(0.9, 1.1);
    let cx = (0.25 + 0.25 * a.position.col as f64 + rng.uniform_in(-0.02, 0.02)) * s;
    let cy = (0.25 + 0.25 * a.position.row as f64 + rng.uniform_in(-0.02, 0.02)) * s;
    render_at(a, size, cx, cy, half)
}

/// Renders `a` with its centre at `(cx, cy)` and half-extent `half` (pixels), anti-aliased
/// with 4×4 samples per pixel.
pub fn render_at(a: &Attributes, size: usize, cx: f64, cy: f64, half: f64) -> RgbImage {
    const SS: usize = 4;
    let fg = rgb_of(&a.colour).unwrap_or([255, 0, 255]);
    let bg = rgb_of(&a.background).unwrap_or([0, 0, 0]);
    let mut img = RgbImage::from_pixel(size as u32, size as u32, Rgb(bg));
    for py in 0..size {
        for px in 0..size {
            let mut hits = 0usize;
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = (px as f64 + (sx as f64 + 0.5) / SS as f64 - cx) / half;
                    let y = (py as f64 + (sy as f64 + 0.5) / SS as f64 - cy) / half;
                    hits += a.shape.contains(x, y) as usize;
                }
            }
            if hits > 0 {
                let t = hits as f64 / (SS * SS) as f64;
                let mix = |c: usize| (fg[c] as f64 * t + bg[c] as f64 * (1.0 - t)).round() as u8;
                img.put_pixel(px as u32, py as u32, Rgb([mix(0), mix(1), mix(2)]));
            }
        }
    }
    img
}

/// Sample `index` of the dataset described by `spec` (independent of the other samples).
pub fn sample(spec: &ShapesSpec, index: usize) -> ShapeSample {
    let mut rng = Rng::new(derive_seed(spec.seed, index as u64));
    let attributes = draw_attributes(spec, &mut rng);
    let with_size = !rng.bernoulli(spec.omit_size);
    let with_position = !rng.bernoulli(spec.omit_position);
    let caption = caption_with(&attributes, with_size, with_position);
    let image = render(&attributes, spec.size, &mut rng);
    ShapeSample { attributes, caption, image }
}

/// One line of `metadata.jsonl`: the imagefolder fields plus the attributes.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShapesRecord {
    /// The image file, relative to the folder.
    pub file_name: String,
    /// The caption.
    pub text: String,
    /// The attributes (extra fields, ignored by training).
    #[serde(flatten)]
    pub attributes: Attributes,
}

/// Writes the dataset into `out` (created if needed): `NNNNNN.png` files, `metadata.jsonl`
/// and [`SPEC_FILE`]. Returns the number of images written.
pub fn write_dataset(spec: &ShapesSpec, out: &Path) -> Result<usize> {
    spec.check()?;
    if spec.count == 0 {
        return Err(TrainError::option("count", "must be at least 1"));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let mut lines = String::new();
    for i in 0..spec.count {
        let s = sample(spec, i);
        let file_name = format!("{i:06}.png");
        let path = out.join(&file_name);
        s.image.save(&path).map_err(|source| TrainError::Image { path, source })?;
        let record = ShapesRecord { file_name, text: s.caption, attributes: s.attributes };
        lines
            .push_str(&serde_json::to_string(&record).map_err(|e| TrainError::msg(e.to_string()))?);
        lines.push('\n');
    }
    crate::checkpoint::write_atomic(&out.join("metadata.jsonl"), lines.as_bytes())?;
    let spec_json =
        serde_json::to_string_pretty(spec).map_err(|e| TrainError::msg(e.to_string()))?;
    crate::checkpoint::write_atomic(&out.join(SPEC_FILE), spec_json.as_bytes())?;
    Ok(spec.count)
}

/// Reads [`SPEC_FILE`] from a make-shapes folder.
pub fn read_spec(dir: &Path) -> Result<ShapesSpec> {
    let path = dir.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::dataset(dir, format!("{SPEC_FILE}: {e}")))
}

/// `n` evaluation cases for the held-out combinations of `spec`: each rule in turn, the
/// attributes it leaves free drawn with `seed`, captioned in full.
pub fn holdout_cases(spec: &ShapesSpec, n: usize, seed: u64) -> Vec<Attributes> {
    let all = all_attributes();
    let per_rule: Vec<Vec<&Attributes>> =
        spec.holdout.iter().map(|r| all.iter().filter(|a| r.matches(a)).collect()).collect();
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    let rules: Vec<&Vec<&Attributes>> = per_rule.iter().filter(|v| !v.is_empty()).collect();
    if rules.is_empty() {
        return out;
    }
    for i in 0..n {
        let pool = rules[i % rules.len()];
        out.push((*rng.choose(pool)).clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_read_as_english() {
        let a = Attributes {
            shape: ShapeKind::Circle,
            colour: "red".into(),
            size: SizeKind::Small,
            position: Position { col: 0, row: 0 },
            background: "blue".into(),
        };
        assert_eq!(caption(&a), "a small red circle in the top left on a blue background");
        assert_eq!(caption_with(&a, false, false), "a red circle on a blue background");
        let b = Attributes { colour: "orange".into(), position: Position { col: 1, row: 2 }, ..a };
        assert_eq!(
            caption_with(&b, false, true),
            "an orange circle at the bottom on a blue background"
        );
        let c = Attributes { position: Position { col: 2, row: 1 }, ..b };
        assert_eq!(
            caption_with(&c, true, true),
            "a small orange circle on the right on a blue background"
        );
    }

    #[test]
    fn holdout_rules_parse_and_match() {
        let r: HoldoutRule = "colour=red, shape=circle".parse().unwrap();
        assert_eq!(r.to_string(), "colour=red,shape=circle");
        let r2: HoldoutRule = "shape=square,position=top-left".parse().unwrap();
        assert_eq!(r2.0[1].1, "top left");
        for bad in ["colour=pink", "hue=red", "colour", ""] {
            let err = bad.parse::<HoldoutRule>().unwrap_err().to_string();
            assert!(err.starts_with("--holdout"), "{bad}: {err}");
        }
        let spec = ShapesSpec { holdout: vec![r.clone()], ..ShapesSpec::new(300, 32, 1) };
        for i in 0..300 {
            assert!(!r.matches(&sample(&spec, i).attributes), "sample {i} is held out");
        }
        let cases = holdout_cases(&spec, 10, 0);
        assert_eq!(cases.len(), 10);
        assert!(cases.iter().all(|a| r.matches(a)));
    }

    #[test]
    fn refuses_to_hold_out_everything() {
        let spec = ShapesSpec {
            holdout: ShapeKind::ALL
                .iter()
                .map(|s| format!("shape={}", s.name()).parse().unwrap())
                .collect(),
            ..ShapesSpec::new(10, 32, 1)
        };
        assert!(spec.check().unwrap_err().to_string().contains("every combination"));
    }

    #[test]
    fn samples_are_deterministic_and_varied() {
        let spec = ShapesSpec::new(50, 32, 9);
        let a = sample(&spec, 7);
        let b = sample(&spec, 7);
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a.caption, b.caption);
        let distinct: std::collections::HashSet<String> =
            (0..50).map(|i| sample(&spec, i).caption).collect();
        assert!(distinct.len() > 40, "{}", distinct.len());
        let other = ShapesSpec { seed: 10, ..spec };
        assert_ne!(sample(&other, 7).image.as_raw(), a.image.as_raw());
    }
}
