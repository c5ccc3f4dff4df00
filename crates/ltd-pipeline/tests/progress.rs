//! Progress and the result count the user's steps (`steps`), not model evaluations: Heun
//! evaluates the model twice per step (but once on the last) and PNDM's PLMS once more at its
//! start, yet a run of 4 steps reports 4, in the callback as in `Generation::steps`, while the
//! callback still sees every evaluation.

use std::path::{Path, PathBuf};

use ltd_pipeline::{GenerateRequest, InitImage, LoadOptions, Pipeline, RgbImage, SamplerKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs `req` on the tiny SD 1.x pipeline (whose own sampler is PNDM, skipping the
/// Runge-Kutta warm-up); returns `(step, total, evaluation, evaluations)` of every callback and
/// the generation's step and evaluation counts.
fn run(req: &GenerateRequest) -> (Vec<[usize; 4]>, usize, usize) {
    let pipe =
        Pipeline::load_folder(&fixtures().join("pipelines/sd1"), &LoadOptions::default()).unwrap();
    let mut seen = Vec::new();
    let out = pipe
        .generate(req, &mut |p| seen.push([p.step, p.total, p.evaluation, p.evaluations]))
        .unwrap();
    (seen, out.steps, out.evaluations)
}

fn request(scheduler: Option<SamplerKind>) -> GenerateRequest {
    GenerateRequest { prompts: vec!["a cat".into()], steps: 4, scheduler, ..Default::default() }
}

/// Checks the counts of one run: `steps` user steps over `evaluations` model evaluations,
/// the step count after each evaluation being `after_each`.
fn check(req: &GenerateRequest, steps: usize, evaluations: usize, after_each: &[usize]) {
    let (seen, out_steps, out_evaluations) = run(req);
    let name = format!("{:?}", req.scheduler);
    assert_eq!((out_steps, out_evaluations), (steps, evaluations), "{name}");
    assert_eq!(seen.len(), evaluations, "{name}: one callback per evaluation");
    let got: Vec<usize> = seen.iter().map(|p| p[0]).collect();
    assert_eq!(got, after_each, "{name}: steps after each evaluation");
    for (i, p) in seen.iter().enumerate() {
        assert_eq!(p[1..], [steps, i + 1, evaluations], "{name}");
    }
}

#[test]
fn heun_and_pndm_report_the_steps_asked_for() {
    check(&request(Some(SamplerKind::Heun)), 4, 7, &[0, 1, 1, 2, 2, 3, 4]);
    check(&request(Some(SamplerKind::Pndm)), 4, 5, &[0, 1, 2, 3, 4]);
    check(&request(None), 4, 5, &[0, 1, 2, 3, 4]);
    check(&request(Some(SamplerKind::Euler)), 4, 4, &[1, 2, 3, 4]);
}

#[test]
fn image_to_image_reports_the_steps_it_runs() {
    let image = RgbImage::new(64, 64, vec![128; 64 * 64 * 3]).unwrap();
    let img2img = |scheduler| GenerateRequest {
        init_image: Some(InitImage { image: image.clone(), strength: 0.5 }),
        ..request(scheduler)
    };
    // ⌊4 · 0.5⌋ = 2 steps: Heun's last 2 · 2 − 1 evaluations, PNDM's last 2 plus its warm-up.
    check(&img2img(Some(SamplerKind::Heun)), 2, 3, &[0, 1, 2]);
    check(&img2img(Some(SamplerKind::Pndm)), 2, 3, &[0, 1, 2]);
}
