//! A captioner trained in slices: a long run as a chain of shorter ones, each starting from
//! the weights the slice before it saved (`init_from`). Training the vision tower until it
//! tells small shapes apart takes hours of these CPUs; in slices, that run survives a
//! stopped process (a slice whose model directory holds a `train.json` for the same
//! settings is not trained again) and stays reproducible from one settings file.
//!
//! The settings file is a JSON array of objects: the first slice's fields over the zoo's
//! defaults, each later slice's over the slice before it (nested objects field by field),
//! so a slice says only what changes, usually its `seed` and step counts. `init_from` is
//! never inherited: a later slice starts from the one before it unless it names its own.
//! A rerun resumes after the last slice it finds trained ([`first_to_train`]).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{CaptionerReport, CaptionerTraining, train_slice};
use crate::error::{TrainError, io_error};
use crate::tokenizer::WorldTokenizer;

/// One slice of a chain: its settings (with `init_from` filled in), where its model goes,
/// and the slices before it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionerSlice {
    pub settings: CaptionerTraining,
    pub dir: PathBuf,
    pub earlier: Vec<CaptionerTraining>,
}

impl CaptionerSlice {
    /// The report of this slice, when its directory already holds one for the same
    /// settings after the same earlier slices.
    pub fn trained(&self) -> Option<CaptionerReport> {
        let text = std::fs::read_to_string(self.dir.join("train.json")).ok()?;
        let report: CaptionerReport = serde_json::from_str(&text).ok()?;
        let chain = |earlier: &[CaptionerTraining], last: &CaptionerTraining| {
            let all = earlier.iter().chain([last]).enumerate();
            all.map(|(index, s)| comparable(index, s)).collect::<Vec<_>>()
        };
        (chain(&report.earlier_slices, &report.settings) == chain(&self.earlier, &self.settings))
            .then_some(report)
    }

    /// Trains this slice and writes its model directory and train.json.
    pub fn train(&self, progress: impl FnMut(usize, f32)) -> Result<CaptionerReport, TrainError> {
        train_slice(&self.settings, &self.earlier, &self.dir, progress)
    }
}

/// Slice `index`'s settings as compared to find it trained. A slice that starts from the
/// one before it names that slice's directory in `init_from`, which moves with the chain
/// (another `--out`, a copied zoo): that path is left out, so a moved chain is still found
/// trained. A path to anything else stays, so pointing a slice elsewhere retrains it.
fn comparable(index: usize, settings: &CaptionerTraining) -> CaptionerTraining {
    let mut settings = settings.clone();
    let before = index.checked_sub(1).map(|i| format!("{i:02}"));
    let from = settings.init_from.as_deref();
    let parent = from.and_then(Path::parent).and_then(Path::file_name);
    if from.and_then(Path::file_name).and_then(|n| n.to_str()) == before.as_deref()
        && parent.is_some_and(|p| p.to_string_lossy().ends_with("-slices"))
    {
        settings.init_from = None;
    }
    settings
}

/// Where slice `index` of a chain whose last slice goes to `out_dir` keeps its model:
/// beside it, `<out_dir>-slices/<index>`. The last slice is kept there too, so a slice
/// appended to the chain later finds it trained.
pub fn slice_dir(out_dir: &Path, index: usize) -> PathBuf {
    let mut name = out_dir.file_name().unwrap_or_default().to_os_string();
    name.push("-slices");
    out_dir.with_file_name(name).join(format!("{index:02}"))
}

/// The slices of a chain, one settings object each (see the module documentation), each
/// in its [`slice_dir`]; [`publish_last`] copies the last one to `out_dir`.
pub fn plan_slices(slices: &[Value], out_dir: &Path) -> Result<Vec<CaptionerSlice>, TrainError> {
    if slices.is_empty() {
        return Err(TrainError::Config(
            "the settings array is empty: give one object of settings per slice".into(),
        ));
    }
    let mut current = serde_json::to_value(CaptionerTraining::default())
        .map_err(|e| TrainError::Config(e.to_string()))?;
    let mut planned: Vec<CaptionerSlice> = Vec::with_capacity(slices.len());
    for (index, slice) in slices.iter().enumerate() {
        if !slice.is_object() {
            return Err(TrainError::Config(format!(
                "slice {index}: expected an object of settings, found {slice}"
            )));
        }
        current["init_from"] = Value::Null;
        merge(&mut current, slice);
        let mut settings: CaptionerTraining =
            serde_json::from_value(current.clone()).map_err(|e| {
                TrainError::Config(format!(
                    "slice {index}: {e} (see the model's train.json for the fields)"
                ))
            })?;
        if let Some(before) = planned.last() {
            let from = settings.init_from.get_or_insert_with(|| before.dir.clone());
            if *from == before.dir && !same_architecture(&before.settings, &settings) {
                return Err(TrainError::Config(format!(
                    "slice {index} changes the architecture (patch size, tower sizes, vocabulary or context) of the slice it starts from; only training settings and the image size may change along a chain"
                )));
            }
        }
        let dir = slice_dir(out_dir, index);
        let earlier = planned.iter().map(|s| s.settings.clone()).collect();
        planned.push(CaptionerSlice { settings, dir, earlier });
    }
    Ok(planned)
}

/// The first slice of `slices` that still needs training: the one after the last slice
/// found trained, or 0. Slices before a trained one are only its starting point, so they
/// are not trained again even where their directories are gone: a chain kept as one late
/// slice (a checkpoint copied to another machine) resumes after it.
pub fn first_to_train(slices: &[CaptionerSlice]) -> usize {
    slices.iter().rposition(|s| s.trained().is_some()).map_or(0, |last| last + 1)
}

/// Copies the model directory of a chain's last slice to `out_dir` (the chain's result),
/// replacing the files of the same names there.
pub fn publish_last(slices: &[CaptionerSlice], out_dir: &Path) -> Result<(), TrainError> {
    let Some(last) = slices.last() else { return Ok(()) };
    std::fs::create_dir_all(out_dir).map_err(io_error(out_dir))?;
    for entry in std::fs::read_dir(&last.dir).map_err(io_error(&last.dir))? {
        let from = entry.map_err(io_error(&last.dir))?.path();
        if from.is_file() {
            let to = out_dir.join(from.file_name().unwrap_or_default());
            std::fs::copy(&from, &to).map_err(io_error(&to))?;
        }
    }
    Ok(())
}

/// Whether a model trained with `a` can continue as one trained with `b`. The vocabulary
/// follows the sampling (generic shape nouns come with `min_shape_fraction`), so it is
/// compared too. The image size may change: the tower's position embeddings are resized
/// to the new patch grid (`init.rs`).
fn same_architecture(a: &CaptionerTraining, b: &CaptionerTraining) -> bool {
    let vocabulary = |s: &CaptionerTraining| WorldTokenizer::for_sampling(&s.sampling).vocab_size();
    a.patch_size == b.patch_size
        && vocabulary(a) == vocabulary(b)
        && a.vision == b.vision
        && a.text == b.text
        && a.max_positions == b.max_positions
}

/// `over`'s fields over `base`'s, objects merged field by field.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(slot) if slot.is_object() && value.is_object() => merge(slot, value),
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}
