//! AUTOMATIC1111's prompt emphasis: `(word)` ×1.1, `((word))` ×1.21, `[word]` ÷1.1,
//! `(word:1.3)`, escapes `\(` `\)` `\[` `\]` `\\`, and `BREAK`, which starts a new 75-token
//! chunk.
//!
//! Three steps, each as A1111 does it:
//! 1. [`parse_prompt_attention`] (`modules/prompt_parser.py`): the prompt as (text, weight)
//!    fragments, `BREAK` as `("BREAK", -1)`.
//! 2. [`CLIPTokenizer::encode_weighted`] (`sd_hijack_clip.py`, `tokenize_line`): each fragment
//!    tokenized on its own, every token carrying its fragment's weight, cut into chunks as
//!    [`CLIPTokenizer::encode_chunks`] cuts them (or truncated to one window, diffusers' rule).
//! 3. [`emphasize`] (`sd_emphasis.py`, `EmphasisOriginal`): after the text encoder, each token's
//!    embedding multiplied by its weight, then the whole rescaled so that its mean is what it
//!    was before.

use candle_core::{DType, Tensor};
use ltd_nn::Result;

use crate::clip_tokenizer::{CLIPTokenizer, LongPrompt};
use crate::encoded::Encoded;

/// The weight A1111 gives `BREAK` in the parsed prompt.
pub const BREAK_WEIGHT: f64 = -1.0;

/// Python's `\s` (Unicode whitespace).
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` (Unicode word characters).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 5 <= chars.len() {
        let word = chars[i..i + 5].iter().collect::<String>() == "BREAK";
        let before = i == 0 || !is_word(chars[i - 1]);
        let after = i + 5 == chars.len() || !is_word(chars[i + 5]);
        if word && before && after {
            let mut left = i;
            while left > start && is_space(chars[left - 1]) {
                left -= 1;
            }
            let mut right = i + 5;
            while right < chars.len() && is_space(chars[right]) {
                right += 1;
            }
            parts.push(chars[start..left].iter().collect());
            start = right;
            i = right;
        } else {
            i += 1;
        }
    }
    parts.push(chars[start..].iter().collect());
    parts
}

/// At `chars[i] == ':'`: A1111's `:\s*([+-]?[.\d]+)\s*\)`, as (weight text, length).
fn weight_at(chars: &[char], i: usize) -> Option<(String, usize)> {
    let mut j = i + 1;
    while j < chars.len() && is_space(chars[j]) {
        j += 1;
    }
    let num_start = j;
    if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
        j += 1;
    }
    let digits = j;
    while j < chars.len() && (chars[j] == '.' || chars[j].is_ascii_digit()) {
        j += 1;
    }
    if j == digits {
        return None;
    }
    let number: String = chars[num_start..j].iter().collect();
    while j < chars.len() && is_space(chars[j]) {
        j += 1;
    }
    (j < chars.len() && chars[j] == ')').then(|| (number, j + 1 - i))
}

/// A1111's `parse_prompt_attention`: the prompt as (text, weight) fragments; `BREAK` as
/// `("BREAK", -1)`; adjacent fragments of equal weight merged; `[("", 1)]` for nothing.
///
/// A weight that Python's `float()` would refuse (`(a:1.2.3)`) is kept as text here, where
/// A1111 fails.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f64)> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in res.iter_mut().skip(from) {
            r.1 *= m;
        }
    };
    let push_text = |res: &mut Vec<(String, f64)>, t: &str| {
        for (i, part) in split_break(t).into_iter().enumerate() {
            if i > 0 {
                res.push(("BREAK".into(), BREAK_WEIGHT));
            }
            res.push((part, 1.0));
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                let escaped = chars.get(i + 1).filter(|n| "()[]\\".contains(**n));
                res.push((escaped.map(|n| n.to_string()).unwrap_or_default(), 1.0));
                i += 1 + usize::from(escaped.is_some());
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ':' => {
                let weight = weight_at(&chars, i);
                match (weight.as_ref().and_then(|(w, _)| w.parse::<f64>().ok()), weight) {
                    (Some(w), Some((_, len))) if !round.is_empty() => {
                        let from = round.pop().unwrap_or(0);
                        multiply(&mut res, from, w);
                        i += len;
                    }
                    (Some(_), Some((_, len))) => {
                        push_text(&mut res, &chars[i..i + len].iter().collect::<String>());
                        i += len;
                    }
                    _ => {
                        push_text(&mut res, ":");
                        i += 1;
                    }
                }
            }
            ')' if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, 1.1);
                i += 1;
            }
            ']' if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, 1.0 / 1.1);
                i += 1;
            }
            ')' | ']' => {
                push_text(&mut res, &c.to_string());
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !"\\()[]:".contains(chars[i]) {
                    i += 1;
                }
                push_text(&mut res, &chars[start..i].iter().collect::<String>());
            }
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
}

/// Whether a parsed prompt is the plain prompt `text` (no emphasis syntax at all): then it
/// is encoded exactly as without emphasis parsing.
pub fn is_plain(parsed: &[(String, f64)], text: &str) -> bool {
    matches!(parsed, [(t, w)] if *w == 1.0 && t == text)
}

/// One chunk of a weighted prompt: the ids, and each position's weight (1 for BOS, EOS and
/// padding).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunk {
    /// The ids, as [`CLIPTokenizer::encode_chunks`] makes them.
    pub encoded: Encoded,
    /// One weight per id.
    pub multipliers: Vec<f64>,
}

impl CLIPTokenizer {
    /// A parsed prompt (from [`parse_prompt_attention`]) as chunks with per-token weights:
    /// A1111's `tokenize_line`. With [`LongPrompt::Truncate`] (and no `BREAK`) one window,
    /// cut as [`CLIPTokenizer::encode`] cuts; with chunks, `BREAK` pads the current chunk and
    /// starts the next.
    pub fn encode_weighted(
        &self,
        parsed: &[(String, f64)],
        mode: LongPrompt,
    ) -> Result<Vec<WeightedChunk>> {
        let n = self.model_max_length() - 2;
        let has_break = parsed.iter().any(|(t, w)| *w == BREAK_WEIGHT && t == "BREAK");
        let comma_backtrack = match mode {
            LongPrompt::Chunks { comma_backtrack } => comma_backtrack,
            LongPrompt::Truncate if has_break => crate::A1111_COMMA_BACKTRACK,
            LongPrompt::Truncate => {
                let mut tokens = Vec::new();
                for (text, weight) in parsed {
                    tokens.extend(self.tokenize(text)?.into_iter().map(|t| (t, *weight)));
                }
                let cut = if tokens.len() > n { tokens.split_off(n) } else { Vec::new() };
                let ids: Vec<u32> = tokens.iter().map(|t| t.0).collect();
                let truncated: Vec<u32> = cut.iter().map(|t| t.0).collect();
                let truncated_text =
                    if truncated.is_empty() { None } else { Some(self.decode(&truncated)?) };
                let weights: Vec<f64> = tokens.iter().map(|t| t.1).collect();
                let encoded = Encoded { truncated, truncated_text, ..self.wrap(&ids) };
                return Ok(vec![self.weighted(encoded, &weights)]);
            }
        };
        let comma = self.comma_id();
        let mut chunks = Vec::new();
        let mut chunk: Vec<(u32, f64)> = Vec::with_capacity(n);
        let mut last_comma: Option<usize> = None;
        let close = |chunk: &mut Vec<(u32, f64)>, chunks: &mut Vec<WeightedChunk>| {
            let ids: Vec<u32> = chunk.iter().map(|t| t.0).collect();
            let weights: Vec<f64> = chunk.iter().map(|t| t.1).collect();
            chunks.push(self.weighted(self.wrap(&ids), &weights));
            chunk.clear();
        };
        for (text, weight) in parsed {
            if *weight == BREAK_WEIGHT && text == "BREAK" {
                close(&mut chunk, &mut chunks);
                last_comma = None;
                continue;
            }
            for token in self.tokenize(text)? {
                if Some(token) == comma {
                    last_comma = Some(chunk.len());
                } else if let Some(c) = last_comma {
                    if comma_backtrack != 0
                        && chunk.len() == n
                        && chunk.len() - c <= comma_backtrack
                    {
                        let moved = chunk.split_off(c + 1);
                        close(&mut chunk, &mut chunks);
                        chunk = moved;
                        last_comma = None;
                    }
                }
                if chunk.len() == n {
                    close(&mut chunk, &mut chunks);
                    last_comma = None;
                }
                chunk.push((token, *weight));
            }
        }
        if !chunk.is_empty() || chunks.is_empty() {
            close(&mut chunk, &mut chunks);
        }
        Ok(chunks)
    }

    fn weighted(&self, encoded: Encoded, weights: &[f64]) -> WeightedChunk {
        let mut multipliers = vec![1.0; encoded.ids.len()];
        multipliers[1..=weights.len()].copy_from_slice(weights);
        WeightedChunk { encoded, multipliers }
    }
}

/// A1111's `EmphasisOriginal.after_transformers` on one prompt's chunk `z` `[L, D]`: `z` times
/// each position's weight, then rescaled to the mean it had (computed in float32). `z` itself
/// when every weight is 1.
pub fn emphasize(z: &Tensor, multipliers: &[f64]) -> Result<Tensor> {
    if multipliers.iter().all(|&m| m == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let m: Vec<f32> = multipliers.iter().map(|&m| m as f32).collect();
    let m = Tensor::from_vec(m, (multipliers.len(), 1), z.device())?;
    let original = z.mean_all()?;
    let weighted = z.broadcast_mul(&m)?;
    let new = weighted.mean_all()?;
    let ratio = (original / new)?;
    Ok(weighted.broadcast_mul(&ratio)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text)
    }

    fn check(text: &str, want: &[(&str, f64)]) {
        let got = p(text);
        assert_eq!(got.len(), want.len(), "{text}: {got:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(want) {
            assert_eq!(gt, wt, "{text}: {got:?}");
            assert!((gw - ww).abs() < 1e-12, "{text}: {got:?}");
        }
    }

    #[test]
    fn parses_a1111_docstring_examples() {
        check("normal text", &[("normal text", 1.0)]);
        check("an (important) word", &[("an ", 1.0), ("important", 1.1), (" word", 1.0)]);
        check("(unbalanced", &[("unbalanced", 1.1)]);
        check("\\(literal\\]", &[("(literal]", 1.0)]);
        check("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
        check(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        );
        check("a BREAK b", &[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]);
        check("", &[("", 1.0)]);
        assert!(is_plain(&p("a cat, on a mat"), "a cat, on a mat"));
        assert!(!is_plain(&p("a (cat)"), "a (cat)"));
    }

    #[test]
    fn emphasis_restores_the_mean() {
        let z = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let out = emphasize(&z, &[1.0, 2.0]).unwrap();
        let v = out.to_vec2::<f32>().unwrap();
        // weighted [[1,2],[6,8]], mean 4.25; original mean 2.5.
        let r = 2.5f32 / 4.25;
        assert_eq!(v, [[r, 2. * r], [6. * r, 8. * r]]);
        assert_eq!(
            emphasize(&z, &[1.0, 1.0]).unwrap().to_vec2::<f32>().unwrap(),
            z.to_vec2::<f32>().unwrap()
        );
    }
}
