//! make-shapes: the same spec writes the same bytes, hold-outs are respected, and the files
//! read back through the imagefolder reader and the analytic checker.

mod common;

use ltd_train::data::ImageFolder;
use ltd_train::shape_check::{analyze, Verdict};
use ltd_train::shapes::{read_spec, write_dataset, HoldoutRule, ShapesRecord, ShapesSpec};

fn spec(seed: u64) -> ShapesSpec {
    ShapesSpec {
        holdout: vec![
            "colour=red,shape=circle".parse().unwrap(),
            "shape=square,position=center".parse().unwrap(),
        ],
        ..ShapesSpec::new(40, 32, seed)
    }
}

#[test]
fn the_same_spec_writes_the_same_files() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_dataset(&spec(5), a.path()).unwrap();
    write_dataset(&spec(5), b.path()).unwrap();
    write_dataset(&spec(6), c.path()).unwrap();
    let fa = common::model_files(a.path());
    assert_eq!(fa.len(), 42, "40 images, metadata.jsonl and shapes.json");
    assert_eq!(fa, common::model_files(b.path()));
    assert_ne!(fa, common::model_files(c.path()));
    assert_eq!(read_spec(a.path()).unwrap(), spec(5));
}

#[test]
fn records_respect_holdouts_and_match_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(7);
    write_dataset(&s, dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("metadata.jsonl")).unwrap();
    let records: Vec<ShapesRecord> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 40);
    let rules: Vec<HoldoutRule> = s.holdout.clone();
    for r in &records {
        assert!(rules.iter().all(|rule| !rule.matches(&r.attributes)), "{r:?}");
        assert!(
            r.text.contains(&r.attributes.colour) && r.text.contains(r.attributes.shape.name())
        );
        let img = image::open(dir.path().join(&r.file_name)).unwrap().to_rgb8();
        assert!(Verdict::judge(&analyze(&img), &r.attributes).all(), "{r:?}");
    }
    // The imagefolder reader takes the folder as it is (extra fields ignored).
    let data = ImageFolder::open(dir.path(), 32).unwrap();
    assert_eq!(data.len(), 40);
    assert_eq!(data.examples()[3].text, records[3].text);
}
