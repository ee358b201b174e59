//! Tables as rows of plain structs: serde rows to Arrow record batches, and Parquet files
//! back to record batches.
//!
//! Result tables have many columns; building each Arrow array by hand would repeat the
//! schema in code. Rows that `#[derive(Serialize)]` go through arrow-json's serde
//! decoder against the table's declared schema instead, which also checks that every row
//! fits the schema (names, types, nullability).

use arrow::datatypes::SchemaRef;
use arrow::json::reader::ReaderBuilder;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::location::Location;

/// The rows as one record batch of `schema`.
pub fn rows_batch<T: Serialize>(
    table: &str,
    schema: SchemaRef,
    rows: &[T],
) -> Result<RecordBatch, StoreError> {
    let err = |source| StoreError::Arrow { table: table.into(), source };
    let mut decoder = ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .map_err(err)?;
    decoder.serialize(rows).map_err(err)?;
    Ok(decoder.flush().map_err(err)?.unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

/// Record batches back to rows (columns matched by name; a null is a `None`).
pub fn batches_rows<T: DeserializeOwned>(
    table: &str,
    batches: &[RecordBatch],
) -> Result<Vec<T>, StoreError> {
    let err = |source| StoreError::Arrow { table: table.into(), source };
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    for batch in batches {
        writer.write(batch).map_err(err)?;
    }
    writer.finish().map_err(err)?;
    let json = writer.into_inner();
    if json.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&json)
        .map_err(|e| err(arrow::error::ArrowError::JsonError(e.to_string())))
}

/// Every record batch of the Parquet file at `location/relative`. The file is fetched
/// whole: dnd reads back only per-task tables and top-K lists, which are small.
pub async fn read_parquet(
    location: &Location,
    relative: &str,
) -> Result<Vec<RecordBatch>, StoreError> {
    let display = location.display_path(relative);
    let bytes = location.get(relative).await?;
    let err = |source| StoreError::Parquet { location: display.clone(), source };
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(err)?.build().map_err(err)?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(e.into()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Schema};

    use super::*;
    use crate::write_parquet;

    #[derive(Serialize)]
    struct Row {
        name: String,
        count: i32,
        score: Option<f64>,
        flag: bool,
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("count", DataType::Int32, false),
            Field::new("score", DataType::Float64, true),
            Field::new("flag", DataType::Boolean, false),
        ]))
    }

    #[tokio::test]
    async fn rows_round_trip_through_parquet() {
        let rows = vec![
            Row { name: "a".into(), count: 1, score: Some(0.5), flag: true },
            Row { name: "b".into(), count: -2, score: None, flag: false },
        ];
        let batch = rows_batch("test", schema(), &rows).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::create(dir.path().to_str().unwrap()).unwrap();
        write_parquet(&loc, "t.parquet", &batch).await.unwrap();
        let back = read_parquet(&loc, "t.parquet").await.unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].schema(), schema());
        assert_eq!(back[0].column(1).as_primitive::<Int32Type>().values(), &[1, -2]);
        let score = back[0].column(2).as_primitive::<Float64Type>();
        assert!(score.is_valid(0) && score.is_null(1));
        assert_eq!(rows_batch("test", schema(), &Vec::<Row>::new()).unwrap().num_rows(), 0);

        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Back {
            name: String,
            count: i32,
            score: Option<f64>,
        }
        let rows: Vec<Back> = batches_rows("test", &back).unwrap();
        assert_eq!(rows[1], Back { name: "b".into(), count: -2, score: None });
    }

    #[test]
    fn a_row_that_breaks_the_schema_is_an_error() {
        #[derive(Serialize)]
        struct Missing {
            name: String,
        }
        let err = rows_batch("test", schema(), &[Missing { name: "a".into() }]).unwrap_err();
        assert!(err.to_string().contains("test"), "{err}");
    }
}
