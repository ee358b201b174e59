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
    /// A vision transformer's class token at the same tap instead of its patch grid (the
    /// class token is no part of the map: the model reads it, see `TargetModel`).
    Cls,
}

impl Pooling {
    /// Pools a row-major `channels x spatial` block into `channels` values; `None` for
    /// [`Pooling::Cls`], which no map holds.
    pub fn pool(self, maps: &[f32], spatial: usize) -> Option<Vec<f32>> {
        assert!(spatial > 0 && maps.len().is_multiple_of(spatial), "maps are not whole channels");
        let reduce = |m: &[f32]| match self {
            Pooling::Mean => {
                Some((m.iter().map(|&v| f64::from(v)).sum::<f64>() / spatial as f64) as f32)
            }
            Pooling::Max => Some(m.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
            Pooling::Cls => None,
        };
        maps.chunks_exact(spatial).map(reduce).collect()
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Max => "max",
            Pooling::Cls => "cls",
        })
    }
}

impl FromStr for Pooling {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "max" => Ok(Pooling::Max),
            "cls" => Ok(Pooling::Cls),
            other => Err(CoreError::invalid(
                "pooling",
                format!("`{other}` is not one of: mean, max, cls (ViT targets)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_max() {
        let maps = [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -6.0];
        assert_eq!(Pooling::Mean.pool(&maps, 4), Some(vec![2.5, -3.0]));
        assert_eq!(Pooling::Max.pool(&maps, 4), Some(vec![4.0, -1.0]));
        assert_eq!(Pooling::Cls.pool(&maps, 4), None);
        assert!("median".parse::<Pooling>().is_err());
        for p in [Pooling::Mean, Pooling::Max, Pooling::Cls] {
            assert_eq!(p.to_string().parse::<Pooling>().unwrap(), p);
        }
    }
}
