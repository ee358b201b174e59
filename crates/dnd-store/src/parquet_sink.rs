//! Streaming Parquet writes straight into an object store.

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::error::StoreError;
use crate::location::Location;

/// Row groups are capped by bytes as well as rows: a row of 2048 activations is 8 KiB,
/// and the writer holds a whole row group in memory.
const MAX_ROW_GROUP_BYTES: usize = 64 << 20;

/// ZSTD everywhere; dictionary encoding only for string columns (ids, layer names),
/// where values repeat. Floats and binary payloads do not profit from it.
fn writer_properties(schema: &SchemaRef) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("3 is a valid zstd level")))
        .set_dictionary_enabled(false)
        .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES));
    for field in schema.fields() {
        if matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8) {
            props =
                props.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), true);
        }
    }
    props.build()
}

/// A Parquet file being written to `location/relative`, batch by batch; it appears in
/// the store only when closed (multipart uploads complete on close).
pub struct ParquetSink {
    writer: AsyncArrowWriter<BufWriter>,
    display: String,
    rows: usize,
}

impl ParquetSink {
    pub fn create(
        location: &Location,
        relative: &str,
        schema: SchemaRef,
    ) -> Result<Self, StoreError> {
        let display = location.display_path(relative);
        let buf = BufWriter::new(location.store().clone(), location.path(relative));
        let props = writer_properties(&schema);
        let writer = AsyncArrowWriter::try_new(buf, schema, Some(props))
            .map_err(|source| StoreError::Parquet { location: display.clone(), source })?;
        Ok(Self { writer, display, rows: 0 })
    }

    pub async fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        self.rows += batch.num_rows();
        self.writer
            .write(batch)
            .await
            .map_err(|source| StoreError::Parquet { location: self.display.clone(), source })
    }

    /// Finishes the file; returns the number of rows written.
    pub async fn close(self) -> Result<usize, StoreError> {
        let display = self.display;
        self.writer
            .close()
            .await
            .map_err(|source| StoreError::Parquet { location: display, source })?;
        Ok(self.rows)
    }
}

/// Writes one whole table in one go.
pub async fn write_parquet(
    location: &Location,
    relative: &str,
    batch: &RecordBatch,
) -> Result<(), StoreError> {
    let mut sink = ParquetSink::create(location, relative, batch.schema())?;
    sink.write(batch).await?;
    sink.close().await?;
    Ok(())
}
