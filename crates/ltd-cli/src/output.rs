//! Writing PNGs: atomically (a temporary file renamed into place), with the generation
//! parameters in a `parameters` text chunk in AUTOMATIC1111's format.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ltd_pipeline::RgbImage;

/// The output paths for `count` images: the path itself for one image, `stem-1.png`,
/// `stem-2.png`, … for several.
pub fn numbered_paths(output: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = output.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or("png".into());
    (1..=count).map(|i| output.with_file_name(format!("{stem}-{i}.{ext}"))).collect()
}

/// Checks an output path before any work is done: a `.png` name in an existing folder.
pub fn check_output(output: &Path) -> Result<()> {
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case("png") {
        bail!("--output {}: ltd-gen writes PNG files; use a name ending in .png", output.display());
    }
    let dir = parent_dir(output);
    if !dir.is_dir() {
        bail!("--output {}: folder {} does not exist", output.display(), dir.display());
    }
    if output.is_dir() {
        bail!("--output {}: is a folder", output.display());
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A PNG written next to its final path; renamed into place by [`Staged::commit`], removed if
/// dropped uncommitted, so no partial file is ever left under the final name.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Encodes `image` with the `parameters` text into a temporary file beside `dest`.
    pub fn write(image: &RgbImage, parameters: &str, dest: &Path) -> Result<Self> {
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent_dir(dest).join(format!(".{name}.{}.tmp", std::process::id()));
        let staged = Self { tmp, dest: dest.to_path_buf(), committed: false };
        encode_png(image, parameters, &staged.tmp)
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(staged)
    }

    /// Moves the file into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("writing {}", self.dest.display()))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn encode_png(image: &RgbImage, parameters: &str, path: &Path) -> Result<()> {
    std::fs::write(path, ltd_cli::encode_png(image, parameters)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// Reads the `parameters` text of a PNG written by ltd-gen (or A1111).
    fn read_parameters(path: &Path) -> Result<Option<String>> {
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(path)?));
        let reader = decoder.read_info()?;
        let info = reader.info();
        let text = info
            .uncompressed_latin1_text
            .iter()
            .find(|t| t.keyword == "parameters")
            .map(|t| t.text.clone());
        let itext = info
            .utf8_text
            .iter()
            .find(|t| t.keyword == "parameters")
            .and_then(|t| t.get_text().ok());
        Ok(text.or(itext))
    }

    #[test]
    fn numbers_batches() {
        assert_eq!(numbered_paths(Path::new("a/out.png"), 1), [PathBuf::from("a/out.png")]);
        assert_eq!(
            numbered_paths(Path::new("a/out.png"), 2),
            [PathBuf::from("a/out-1.png"), PathBuf::from("a/out-2.png")]
        );
    }

    #[test]
    fn writes_atomically_with_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.png");
        let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let staged = Staged::write(&img, "a cat\nSteps: 1", &dest).unwrap();
        assert!(!dest.exists(), "nothing under the final name before commit");
        staged.commit().unwrap();
        assert_eq!(read_parameters(&dest).unwrap().as_deref(), Some("a cat\nSteps: 1"));
        // Non-Latin-1 text goes to iTXt and reads back.
        let dest2 = dir.path().join("y.png");
        Staged::write(&img, "猫\nSteps: 1", &dest2).unwrap().commit().unwrap();
        assert_eq!(read_parameters(&dest2).unwrap().as_deref(), Some("猫\nSteps: 1"));
        // Dropped without commit: no file left behind at all.
        drop(Staged::write(&img, "x", &dir.path().join("z.png")).unwrap());
        let left: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn checks_outputs() {
        assert!(check_output(Path::new("out.jpg")).unwrap_err().to_string().contains(".png"));
        assert!(check_output(Path::new("/no/such/dir/out.png"))
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        assert!(check_output(Path::new("out.png")).is_ok());
    }
}
