//! A1111's emphasis against the fixtures `generate.py`'s `emphasis` section wrote with A1111's
//! own functions: the parser on its documented examples and more (weights equal to the last
//! bit but for the JSON parse: both multiply the same float64s in the same order), and the embedding arithmetic
//! against torch's float32 result.

use candle_core::{DType, Device};
use ltd_test_support::{fixtures, max_abs_diff};
use ltd_text::{emphasize, parse_prompt_attention};
use serde_json::Value;

#[test]
fn parser_matches_a1111() {
    let path = fixtures().join("golden/emphasis/parse.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 14);
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<(String, f64)> = case["parsed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
            .collect();
        let got = parse_prompt_attention(prompt);
        assert_eq!(got.len(), want.len(), "{prompt:?}: {got:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(&want) {
            // serde_json's float parsing may be one ulp off Python's repr; the products are
            // the same float64 operations in the same order.
            assert!(gt == wt && (gw - ww).abs() <= 1e-15 * ww.abs(), "{prompt:?}: {got:?}");
        }
    }
}

#[test]
fn emphasis_arithmetic_matches_a1111() {
    let path = fixtures().join("golden/emphasis/arithmetic.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let multipliers: Vec<f64> = t["multipliers"].to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let got = emphasize(&t["z"], &multipliers).unwrap();
    let err = max_abs_diff(&got, &t["emphasized"]);
    assert!(err < 1e-6, "max abs error {err}");
}
