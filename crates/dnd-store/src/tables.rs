//! The probe stage's tables: Arrow schemas and record-batch builders.
//!
//! `docs/schema.md` documents every column; these functions are the one place the
//! schemas are defined, so readers in any language see the same columns.

use dnd_core::{LayerName, NeuronId, UnitKind, UnitStatus};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, Int32Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::error::StoreError;

fn batch(
    table: &str,
    schema: SchemaRef,
    columns: Vec<ArrayRef>,
) -> Result<RecordBatch, StoreError> {
    RecordBatch::try_new(schema, columns)
        .map_err(|source| StoreError::Arrow { table: table.into(), source })
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn ints(values: impl Iterator<Item = i32>) -> ArrayRef {
    Arc::new(Int32Array::from_iter_values(values))
}

/// One entry of a neuron's top-K list.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopKRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// 0 = the most activating image.
    pub rank: i32,
    pub image_id: String,
    pub activation: f32,
}

pub fn topk_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("layer", DataType::Utf8, false),
        Field::new("neuron", DataType::Int32, false),
        Field::new("rank", DataType::Int32, false),
        Field::new("image_id", DataType::Utf8, false),
        Field::new("activation", DataType::Float32, false),
    ]))
}

pub fn topk_batch(rows: &[TopKRow]) -> Result<RecordBatch, StoreError> {
    batch(
        "topk",
        topk_schema(),
        vec![
            strings(rows.iter().map(|r| r.layer.as_str())),
            ints(rows.iter().map(|r| r.neuron.to_i32())),
            ints(rows.iter().map(|r| r.rank)),
            strings(rows.iter().map(|r| r.image_id.as_str())),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.activation))),
        ],
    )
}

/// One unit of a layer described by a dictionary (an SAE latent, a direction): what it
/// is and how often it fired on the probe set. A probe slice writes `units/<layer>.parquet`
/// with its own counts; the job's `probe/units/<layer>.parquet` sums them over slices.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnitRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    pub unit_kind: UnitKind,
    /// The dictionary's identity, `blake3:...`.
    pub unit_source: Option<String>,
    /// Its name, where the dictionary gives one (directions).
    pub name: Option<String>,
    /// Probe images counted.
    pub images: i64,
    /// Images on which it was above 0 somewhere.
    pub fired_images: i64,
    /// Sum over images of the share of positions where it was above 0.
    pub position_share: f64,
    /// `position_share / images`: its share of all probe positions above 0.
    pub firing_rate: f64,
    /// `active`, `dead` or `dense` (SAE latents; directions are always `active`).
    pub status: UnitStatus,
}

pub fn units_schema() -> SchemaRef {
    use DataType::{Float64, Int32, Int64, Utf8};
    Arc::new(Schema::new(vec![
        Field::new("layer", Utf8, false),
        Field::new("neuron", Int32, false),
        Field::new("unit_kind", Utf8, false),
        Field::new("unit_source", Utf8, true),
        Field::new("name", Utf8, true),
        Field::new("images", Int64, false),
        Field::new("fired_images", Int64, false),
        Field::new("position_share", Float64, false),
        Field::new("firing_rate", Float64, false),
        Field::new("status", Utf8, false),
    ]))
}

pub fn units_batch(rows: &[UnitRow]) -> Result<RecordBatch, StoreError> {
    crate::rows::rows_batch("units", units_schema(), rows)
}

/// Pooled activations of every neuron of one layer: one row per image, the neurons as a
/// fixed-size vector (`FLOAT[width]` in DuckDB, `Array` in Polars).
pub fn activations_schema(width: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new(
            "activation",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                width as i32,
            ),
            false,
        ),
    ]))
}

/// `values` is row-major `image_ids.len() x width`.
pub fn activations_batch(
    image_ids: &[&str],
    width: usize,
    values: Vec<f32>,
) -> Result<RecordBatch, StoreError> {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list =
        FixedSizeListArray::try_new(item, width as i32, Arc::new(Float32Array::from(values)), None)
            .map_err(|source| StoreError::Arrow { table: "activations".into(), source })?;
    batch(
        "activations",
        activations_schema(width),
        vec![strings(image_ids.iter().copied()), Arc::new(list)],
    )
}

/// An input that was skipped, and why.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ErrorRow {
    pub image_id: String,
    /// The stage that met the problem: `list`, `read`, `decode`, `crop`.
    pub stage: String,
    /// A short machine-readable kind: `empty`, `not_an_image`, `unsupported`, `corrupt`,
    /// `truncated`, `too_large`, `unreadable`.
    pub reason: String,
    /// The full message, for people.
    pub message: String,
}

pub fn errors_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
    ]))
}

pub fn errors_batch(rows: &[ErrorRow]) -> Result<RecordBatch, StoreError> {
    batch(
        "errors",
        errors_schema(),
        vec![
            strings(rows.iter().map(|r| r.image_id.as_str())),
            strings(rows.iter().map(|r| r.stage.as_str())),
            strings(rows.iter().map(|r| r.reason.as_str())),
            strings(rows.iter().map(|r| r.message.as_str())),
        ],
    )
}

/// One attention crop of one of a neuron's top images.
#[derive(Debug, Clone, PartialEq)]
pub struct CropRow {
    pub layer: LayerName,
    pub neuron: NeuronId,
    /// Rank of the source image in the neuron's top-K list.
    pub rank: i32,
    pub image_id: String,
    /// The neuron's pooled activation on the source image (from the top-K list).
    pub image_activation: f32,
    /// 0 = the largest crop of this image.
    pub crop_index: i32,
    /// Side of the square canvas the box is measured on (the source image resized).
    pub canvas_size: i32,
    /// Box on the canvas, end exclusive.
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
    /// Otsu level of the 8-bit heatmap that produced the box.
    pub threshold: i32,
    /// The crop, resized back to `canvas_size` square, as PNG.
    pub png: Vec<u8>,
}

pub fn crops_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("layer", DataType::Utf8, false),
        Field::new("neuron", DataType::Int32, false),
        Field::new("rank", DataType::Int32, false),
        Field::new("image_id", DataType::Utf8, false),
        Field::new("image_activation", DataType::Float32, false),
        Field::new("crop_index", DataType::Int32, false),
        Field::new("canvas_size", DataType::Int32, false),
        Field::new("x0", DataType::Int32, false),
        Field::new("y0", DataType::Int32, false),
        Field::new("x1", DataType::Int32, false),
        Field::new("y1", DataType::Int32, false),
        Field::new("threshold", DataType::Int32, false),
        Field::new("png", DataType::Binary, false),
    ]))
}

pub fn crops_batch(rows: &[CropRow]) -> Result<RecordBatch, StoreError> {
    batch(
        "crops",
        crops_schema(),
        vec![
            strings(rows.iter().map(|r| r.layer.as_str())),
            ints(rows.iter().map(|r| r.neuron.to_i32())),
            ints(rows.iter().map(|r| r.rank)),
            strings(rows.iter().map(|r| r.image_id.as_str())),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.image_activation))),
            ints(rows.iter().map(|r| r.crop_index)),
            ints(rows.iter().map(|r| r.canvas_size)),
            ints(rows.iter().map(|r| r.x0)),
            ints(rows.iter().map(|r| r.y0)),
            ints(rows.iter().map(|r| r.x1)),
            ints(rows.iter().map(|r| r.y1)),
            ints(rows.iter().map(|r| r.threshold)),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.png.as_slice()))),
        ],
    )
}
