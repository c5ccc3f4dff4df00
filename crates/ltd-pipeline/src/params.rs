//! Generation parameters in AUTOMATIC1111's "infotext" format, the de-facto standard that
//! image viewers and web UIs read from a PNG's `parameters` text chunk:
//!
//! ```text
//! a cat in a hat
//! Negative prompt: blurry
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15
//! ```

/// Everything needed to recreate an image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt, if any.
    pub negative: Option<String>,
    /// Inference steps.
    pub steps: usize,
    /// Sampler name as A1111 spells it (`Euler a`, `DPM++ 2M`, …: `SamplerKind::a1111_name`).
    pub sampler: String,
    /// A1111's schedule type (`Karras`), when not the sampler's default.
    pub schedule_type: Option<String>,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// The seed.
    pub seed: u64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The model (folder name or hub id).
    pub model: String,
    /// A1111's `Model hash` of a single-file checkpoint (ten hex digits of its SHA-256).
    pub model_hash: Option<String>,
    /// Further `Key: value` pairs in order (`Denoising strength`, `Clip skip`, `Batch size`…).
    pub extra: Vec<(String, String)>,
}

/// Quotes a value the way A1111 does when it holds a separator.
fn quote(v: &str) -> String {
    if v.contains([',', '\n', ':', '"']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// A float as A1111 writes it: no trailing `.0` for whole numbers.
pub fn fmt_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

impl GenerationParams {
    /// The infotext string.
    pub fn to_infotext(&self) -> String {
        let mut out = self.prompt.clone();
        if let Some(neg) = self.negative.as_deref().filter(|n| !n.is_empty()) {
            out.push_str("\nNegative prompt: ");
            out.push_str(neg);
        }
        let mut pairs: Vec<(String, String)> = vec![
            ("Steps".into(), self.steps.to_string()),
            ("Sampler".into(), self.sampler.clone()),
        ];
        if let Some(s) = &self.schedule_type {
            pairs.push(("Schedule type".into(), s.clone()));
        }
        pairs.push(("CFG scale".into(), fmt_number(self.cfg_scale)));
        pairs.push(("Seed".into(), self.seed.to_string()));
        pairs.push(("Size".into(), format!("{}x{}", self.width, self.height)));
        if let Some(hash) = &self.model_hash {
            pairs.push(("Model hash".into(), hash.clone()));
        }
        pairs.push(("Model".into(), self.model.clone()));
        pairs.extend(self.extra.iter().cloned());
        let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
        out.push('\n');
        out.push_str(&line.join(", "));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a1111_infotext() {
        let p = GenerationParams {
            prompt: "a cat in a hat".into(),
            negative: Some("blurry".into()),
            steps: 20,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.5,
            seed: 42,
            width: 512,
            height: 768,
            model: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
            model_hash: None,
            extra: vec![("Clip skip".into(), "2".into()), ("Note".into(), "a, b".into())],
        };
        expect_test::expect![[r#"
            a cat in a hat
            Negative prompt: blurry
            Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: stable-diffusion-v1-5/stable-diffusion-v1-5, Clip skip: 2, Note: "a, b""#]]
        .assert_eq(&p.to_infotext());
        let p = GenerationParams {
            negative: None,
            cfg_scale: 7.0,
            schedule_type: None,
            extra: vec![],
            ..p
        };
        assert!(p.to_infotext().ends_with("CFG scale: 7, Seed: 42, Size: 512x768, Model: stable-diffusion-v1-5/stable-diffusion-v1-5"));
        assert!(!p.to_infotext().contains("Negative"));
    }

    /// A single-file checkpoint's hash comes before its name, as A1111 writes them.
    #[test]
    fn writes_the_model_hash_before_the_model() {
        let p = GenerationParams {
            prompt: "a cat".into(),
            negative: None,
            steps: 20,
            sampler: "Euler".into(),
            schedule_type: None,
            cfg_scale: 7.0,
            seed: 1,
            width: 512,
            height: 512,
            model: "dreamshaper_8".into(),
            model_hash: Some("879db523c3".into()),
            extra: vec![],
        };
        assert!(
            p.to_infotext()
                .ends_with("Size: 512x512, Model hash: 879db523c3, Model: dreamshaper_8"),
            "{}",
            p.to_infotext()
        );
    }
}
