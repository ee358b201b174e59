//! The results dataset of a dissection: one table per kind of evidence, keyed by
//! `(layer, neuron)`, where a neuron is a unit of the layer: a channel, a direction or an
//! SAE latent (`unit_kind`, with the dictionary's identity in `unit_source`). `docs/schema.md` documents every column; the schemas below are the
//! one place they are defined.
//!
//! Each neuron task writes every table for its neurons; compaction concatenates the
//! committed tasks' tables into `results/<table>.parquet`.

use dnd_core::{LayerName, NeuronId, UnitKind};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::rows::rows_batch;

/// A results table: its name (file stem) and schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultTable {
    Descriptions,
    Candidates,
    Scores,
    Captions,
    Images,
    Exchanges,
    Errors,
    /// Each reported label scored against its neuron (`[evaluate]`, `dnd evaluate`).
    Evaluation,
}

impl ResultTable {
    pub const ALL: [ResultTable; 8] = [
        ResultTable::Descriptions,
        ResultTable::Candidates,
        ResultTable::Scores,
        ResultTable::Captions,
        ResultTable::Images,
        ResultTable::Exchanges,
        ResultTable::Errors,
        ResultTable::Evaluation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResultTable::Descriptions => "descriptions",
            ResultTable::Candidates => "candidates",
            ResultTable::Scores => "scores",
            ResultTable::Captions => "captions",
            ResultTable::Images => "images",
            ResultTable::Exchanges => "exchanges",
            ResultTable::Errors => "errors",
            ResultTable::Evaluation => "evaluation",
        }
    }

    pub fn file(self) -> String {
        format!("{}.parquet", self.name())
    }

    pub fn schema(self) -> SchemaRef {
        use DataType::{Boolean, Float32, Float64, Int32, Int64, Utf8};
        let key = [
            Field::new("layer", Utf8, false),
            Field::new("neuron", Int32, false),
            Field::new("unit_kind", Utf8, false),
            Field::new("unit_source", Utf8, true),
        ];
        let f = |name: &str, t: DataType, nullable: bool| Field::new(name, t, nullable);
        let rest: Vec<Field> = match self {
            ResultTable::Descriptions => vec![
                f("status", Utf8, false),
                f("label", Utf8, true),
                f("score", Float64, true),
                f("label_2", Utf8, true),
                f("score_2", Float64, true),
                f("label_3", Utf8, true),
                f("score_3", Float64, true),
                f("candidates", Int32, false),
                f("top_images", Int32, false),
                f("captions_cached", Int32, false),
                f("captions_total", Int32, false),
                f("replies_cached", Int32, false),
                f("replies_total", Int32, false),
                f("images_cached", Int32, false),
                f("images_total", Int32, false),
                f("error", Utf8, true),
                f("task", Utf8, false),
            ],
            ResultTable::Candidates => vec![
                f("candidate", Int32, false),
                f("concept", Utf8, false),
                f("prompt", Utf8, false),
                f("images", Int32, false),
                f("final_rank", Int32, false),
                f("selected", Boolean, false),
            ],
            ResultTable::Scores => vec![
                f("candidate", Int32, false),
                f("concept", Utf8, false),
                f("topk_sq_mean", Float64, true),
                f("mean", Float64, true),
                f("median", Float64, true),
                f("sq_mean", Float64, true),
                f("rank_score", Utf8, false),
                f("rank_order", Int32, false),
                f("similarity", Float64, false),
                f("final_score", Float64, false),
                f("final_rank", Int32, false),
            ],
            ResultTable::Captions => vec![
                f("image_rank", Int32, false),
                f("image_hash", Utf8, false),
                f("caption", Utf8, false),
                f("simplified", Utf8, true),
                f("captioner", Utf8, false),
                f("cached", Boolean, false),
            ],
            ResultTable::Images => vec![
                f("kind", Utf8, false),
                f("rank", Int32, false),
                f("activation", Float32, false),
                f("top", Boolean, false),
                f("image_id", Utf8, true),
                f("crop_index", Int32, true),
                f("canvas_size", Int32, true),
                f("x0", Int32, true),
                f("y0", Int32, true),
                f("x1", Int32, true),
                f("y1", Int32, true),
                f("candidate", Int32, true),
                f("concept", Utf8, true),
                f("seed", Int64, true),
                f("similarity", Float32, true),
                f("uri", Utf8, false),
                f("image_hash", Utf8, false),
                f("cached", Boolean, false),
            ],
            ResultTable::Exchanges => vec![
                f("seq", Int32, false),
                f("step", Utf8, false),
                f("backend", Utf8, false),
                f("model", Utf8, false),
                f("prompt_version", Utf8, false),
                f("request", Utf8, false),
                f("reply", Utf8, false),
                f("answer", Utf8, true),
                f("error", Utf8, true),
                f("cached", Boolean, false),
            ],
            ResultTable::Errors => vec![
                f("stage", Utf8, false),
                f("image_id", Utf8, true),
                f("reason", Utf8, false),
                f("message", Utf8, false),
                f("task", Utf8, false),
            ],
            ResultTable::Evaluation => vec![
                f("source", Utf8, false),
                f("label_rank", Int32, false),
                f("label", Utf8, false),
                f("metric", Utf8, false),
                f("quantile", Float64, true),
                f("value", Float64, true),
                f("ci_low", Float64, true),
                f("ci_high", Float64, true),
                f("images", Int32, false),
            ],
        };
        Arc::new(Schema::new(key.into_iter().chain(rest).collect::<Vec<_>>()))
    }

    pub fn batch<T: Serialize>(self, rows: &[T]) -> Result<RecordBatch, StoreError> {
        rows_batch(self.name(), self.schema(), rows)
    }
}

/// A results table without what depends on how the run went rather than on the job:
/// where files are (`uri`, which names the store) and whether a value came from the cache
/// (`cached`, `*_cached`: two workers may compute the same caption at once where one
/// worker would reuse it). Two runs of one job, however they were scheduled, retried or
/// interrupted, give equal tables once these columns are left out.
pub fn run_independent(batch: &RecordBatch) -> RecordBatch {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|&i| {
            let name = batch.schema_ref().field(i).name();
            name != "uri" && name != "cached" && !name.ends_with("_cached")
        })
        .collect();
    batch.project(&keep).expect("the kept columns are the batch's own")
}

/// A neuron's outcome, the `status` column of `descriptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DescriptionStatus {
    /// Labelled: it has candidates, scored.
    Ok,
    /// Its captions gave no candidate concept.
    NoCandidates,
    /// Its summariser failed, or its whole task did.
    Failed,
    /// An SAE latent that never fired on the probe set: not described (`[units] skip`).
    Dead,
    /// An SAE latent that fired nearly everywhere on the probe set: not described.
    Dense,
}

impl DescriptionStatus {
    pub const ALL: [DescriptionStatus; 5] = [
        DescriptionStatus::Ok,
        DescriptionStatus::NoCandidates,
        DescriptionStatus::Failed,
        DescriptionStatus::Dead,
        DescriptionStatus::Dense,
    ];

    /// As the table stores it.
    pub const fn as_str(self) -> &'static str {
        match self {
            DescriptionStatus::Ok => "ok",
            DescriptionStatus::NoCandidates => "no_candidates",
            DescriptionStatus::Failed => "failed",
            DescriptionStatus::Dead => "dead",
            DescriptionStatus::Dense => "dense",
        }
    }
}

impl std::fmt::Display for DescriptionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for DescriptionStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One neuron's outcome: its top labels, or why it has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DescriptionRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    pub status: DescriptionStatus,
    pub label: Option<String>,
    pub score: Option<f64>,
    pub label_2: Option<String>,
    pub score_2: Option<f64>,
    pub label_3: Option<String>,
    pub score_3: Option<f64>,
    pub candidates: i32,
    pub top_images: i32,
    pub captions_cached: i32,
    pub captions_total: i32,
    pub replies_cached: i32,
    pub replies_total: i32,
    pub images_cached: i32,
    pub images_total: i32,
    pub error: Option<String>,
    pub task: String,
}

impl DescriptionRow {
    /// The row of a unit that got no label (skipped for its status, or failed): its
    /// identity, status and task, every label, score and count empty.
    pub fn unlabelled(
        layer: LayerName,
        neuron: NeuronId,
        unit_kind: UnitKind,
        unit_source: Option<String>,
        status: DescriptionStatus,
        task: String,
    ) -> Self {
        Self {
            layer,
            neuron,
            unit_kind,
            unit_source,
            status,
            label: None,
            score: None,
            label_2: None,
            score_2: None,
            label_3: None,
            score_3: None,
            candidates: 0,
            top_images: 0,
            captions_cached: 0,
            captions_total: 0,
            replies_cached: 0,
            replies_total: 0,
            images_cached: 0,
            images_total: 0,
            error: None,
            task,
        }
    }
}

/// A candidate concept of a neuron.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// Index in the order the summary rounds produced the candidates.
    pub candidate: i32,
    pub concept: String,
    /// The text-to-image prompt made from it.
    pub prompt: String,
    /// Generated images it got.
    pub images: i32,
    pub final_rank: i32,
    /// Among the reported labels.
    pub selected: bool,
}

/// Every stage-3 number of a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    pub candidate: i32,
    pub concept: String,
    pub topk_sq_mean: Option<f64>,
    pub mean: Option<f64>,
    pub median: Option<f64>,
    pub sq_mean: Option<f64>,
    /// Which of the rank scores ordered the candidates.
    pub rank_score: String,
    pub rank_order: i32,
    pub similarity: f64,
    pub final_score: f64,
    pub final_rank: i32,
}

/// The caption of one of a neuron's top images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// The image's rank among the neuron's top images.
    pub image_rank: i32,
    pub image_hash: String,
    pub caption: String,
    /// The summariser's 1-5 word label for it, when it gave one.
    pub simplified: Option<String>,
    pub captioner: String,
    pub cached: bool,
}

/// An image in a neuron's evidence: an original probe image, an attention crop of one, or
/// an image generated for a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// `original`, `crop` or `generated`.
    pub kind: String,
    /// Originals and crops: position among them by activation. Generated: position among
    /// all of the neuron's generated images.
    pub rank: i32,
    pub activation: f32,
    /// Originals and crops: among the neuron's top images (captioned). Generated: in the
    /// top positions that the similarity weight uses.
    pub top: bool,
    /// The probe image (originals and crops).
    pub image_id: Option<String>,
    pub crop_index: Option<i32>,
    /// The crop's box on the square canvas the attention map was taken on.
    pub canvas_size: Option<i32>,
    pub x0: Option<i32>,
    pub y0: Option<i32>,
    pub x1: Option<i32>,
    pub y1: Option<i32>,
    pub candidate: Option<i32>,
    pub concept: Option<String>,
    pub seed: Option<i64>,
    /// Generated: mean cosine similarity to the neuron's top images.
    pub similarity: Option<f32>,
    /// Where the image is: the probe image's URL or path, or the stored PNG.
    pub uri: String,
    /// BLAKE3 of the image's RGB pixels and size.
    pub image_hash: String,
    /// Generated: served from the image cache.
    pub cached: bool,
}

/// One summariser request and reply, verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// Order of the exchange within the neuron.
    pub seq: i32,
    /// `simplify`, `summarize` or `merge`.
    pub step: String,
    pub backend: String,
    pub model: String,
    pub prompt_version: String,
    pub request: String,
    pub reply: String,
    /// The cleaned label, or the listed labels joined by `; `.
    pub answer: Option<String>,
    /// Why the reply gave no label.
    pub error: Option<String>,
    pub cached: bool,
}

/// One metric of one of a neuron's labels (`dnd_core::evaluation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// Whose labels: `dnd` for the job's own, else the labels file's name.
    pub source: String,
    /// 1 for the neuron's best label, 2 and 3 for the next.
    pub label_rank: i32,
    pub label: String,
    /// `correlation`, `auprc`, `f1`, `iou`, `cosy_auc` or `cosy_mad`.
    pub metric: String,
    /// The top share of probe images that counts as firing (AUPRC, F1, IoU).
    pub quantile: Option<f64>,
    /// Missing when the inputs cannot define it (a constant prediction's correlation).
    pub value: Option<f64>,
    /// The 95% bootstrap interval over images.
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// Images the value is computed on.
    pub images: i32,
}

/// A problem met while describing a neuron; the rest of the job goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronErrorRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// `channel`, `direction` or `sae`.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// The dictionary's identity (`blake3:...`); none for channels.
    #[serde(default)]
    pub unit_source: Option<String>,
    /// The stage: `read`, `crop`, `caption`, `summarize`, `generate`, `score`.
    pub stage: String,
    pub image_id: Option<String>,
    pub reason: String,
    pub message: String,
    pub task: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_starts_with_the_neuron_key_and_builds_from_its_rows() {
        for table in ResultTable::ALL {
            let schema = table.schema();
            assert_eq!(schema.field(0).name(), "layer");
            assert_eq!(schema.field(1).name(), "neuron");
            assert_eq!(schema.field(2).name(), "unit_kind");
            assert_eq!(schema.field(3).name(), "unit_source");
        }
        let row = DescriptionRow {
            layer: "layer4".into(),
            neuron: NeuronId::new(3),
            unit_kind: UnitKind::Sae,
            unit_source: Some("blake3:0123456789abcdef".into()),
            status: DescriptionStatus::Ok,
            label: Some("red circles".into()),
            score: Some(2.5),
            label_2: None,
            score_2: None,
            label_3: None,
            score_3: None,
            candidates: 1,
            top_images: 10,
            captions_cached: 0,
            captions_total: 10,
            replies_cached: 0,
            replies_total: 15,
            images_cached: 0,
            images_total: 10,
            error: None,
            task: "layer4-00000".into(),
        };
        let batch = ResultTable::Descriptions.batch(std::slice::from_ref(&row)).unwrap();
        assert_eq!(batch.num_rows(), 1);
        let back: Vec<DescriptionRow> = crate::batches_rows("descriptions", &[batch]).unwrap();
        assert_eq!(back, [row], "the status is stored as its name and read back");
    }

    #[test]
    fn statuses_are_stored_by_name() {
        for status in DescriptionStatus::ALL {
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert!(status == status.as_str());
        }
    }
}
