//! Reducing a neuron's spatial map to one number per image.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::CoreError;

/// How a channel's spatial map becomes its pooled activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Spatial mean (the method's default).
    #[default]
    Mean,
    /// Spatial max.
    Max,
}

impl Pooling {
    /// Pools a row-major `channels x spatial` block into `channels` values.
    pub fn pool(self, maps: &[f32], spatial: usize) -> Vec<f32> {
        assert!(spatial > 0 && maps.len().is_multiple_of(spatial), "maps are not whole channels");
        maps.chunks_exact(spatial)
            .map(|m| match self {
                Pooling::Mean => {
                    (m.iter().map(|&v| f64::from(v)).sum::<f64>() / spatial as f64) as f32
                }
                Pooling::Max => m.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            })
            .collect()
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Max => "max",
        })
    }
}

impl FromStr for Pooling {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "max" => Ok(Pooling::Max),
            other => {
                Err(CoreError::invalid("pooling", format!("`{other}` is not one of: mean, max")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_max() {
        let maps = [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -6.0];
        assert_eq!(Pooling::Mean.pool(&maps, 4), vec![2.5, -3.0]);
        assert_eq!(Pooling::Max.pool(&maps, 4), vec![4.0, -1.0]);
        assert!("median".parse::<Pooling>().is_err());
    }
}
