//! The trainer's one JSON file writer (model configs, `planted.json`, `train.json`).

use std::path::Path;

use serde::Serialize;

/// Writes `value` as pretty JSON with a final newline to `path`.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}
