//! A step callback can stop a generation (`Progress::cancel`, a server's interrupt) and ask
//! for a preview of the latents it sees (`Pipeline::preview`).

use ltd_pipeline::{GenerateRequest, LoadOptions, Pipeline, PipelineError, SamplerKind};
use ltd_test_support::fixtures;

fn pipeline() -> Pipeline {
    Pipeline::load_folder(&fixtures().join("pipelines/sd1"), &LoadOptions::default()).unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a cat".into()],
        steps: 4,
        scheduler: Some(SamplerKind::Euler),
        num_images: 2,
        ..Default::default()
    }
}

#[test]
fn cancel_stops_at_the_step_it_is_called() {
    let pipe = pipeline();
    let mut calls = 0;
    let err = pipe
        .generate(&request(), &mut |p| {
            calls += 1;
            if p.step == 2 {
                p.cancel();
            }
        })
        .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled { step: 2, total: 4 }), "{err:?}");
    assert_eq!(err.to_string(), "cancelled after step 2 of 4");
    assert_eq!(calls, 2, "no step runs after the cancel");
    // The pipeline is unharmed: the next request runs to its end.
    assert_eq!(pipe.generate(&request(), &mut |_| {}).unwrap().images.len(), 2);
}

#[test]
fn the_last_preview_is_the_first_image() {
    let pipe = pipeline();
    let mut previews = Vec::new();
    let out = pipe
        .generate(&request(), &mut |p| previews.push(pipe.preview(p.latents).unwrap()))
        .unwrap();
    assert_eq!(previews.len(), 4);
    let first = &out.images[0].image;
    assert!(previews.iter().all(|p| (p.width, p.height) == (first.width, first.height)));
    assert_eq!(previews.last().unwrap(), first);
}
