use thiserror::Error;

use crate::geometry::Rect;

/// Errors of the synthetic world. All of them are about something the caller passed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SynthError {
    #[error("image size {width}x{height} is empty: width and height must be at least 1")]
    EmptyImage { width: u32, height: u32 },

    #[error("crop {rect} is empty or does not fit in a {width}x{height} image")]
    BadCrop { rect: Rect, width: u32, height: u32 },

    #[error(
        "masks of different sizes cannot be combined: {left_width}x{left_height} and {right_width}x{right_height}"
    )]
    MaskSizeMismatch { left_width: u32, left_height: u32, right_width: u32, right_height: u32 },

    #[error(
        "the rendering has {masks} object masks but the scene has {objects} objects: pass the scene that was rendered"
    )]
    SceneMismatch { objects: usize, masks: usize },

    /// Reading or writing a file failed (the I/O error as text, so errors stay comparable).
    #[error("{}: {reason}", path.display())]
    Io { path: std::path::PathBuf, reason: String },
}
