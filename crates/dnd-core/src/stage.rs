//! The stages of the method, by name: what progress, heartbeats and metrics count.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A stage of a dissection. Stage 0 is the probe; a neuron task runs the other five, in
/// the order of [`Stage::DESCRIBE`], each advancing by the task's neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Probe,
    Crop,
    Caption,
    Summarize,
    Generate,
    Score,
}

impl Stage {
    /// The stages of a neuron task, in order.
    pub const DESCRIBE: [Stage; 5] =
        [Stage::Crop, Stage::Caption, Stage::Summarize, Stage::Generate, Stage::Score];

    /// Every stage, in order.
    pub const ALL: [Stage; 6] = [
        Stage::Probe,
        Stage::Crop,
        Stage::Caption,
        Stage::Summarize,
        Stage::Generate,
        Stage::Score,
    ];

    /// The name progress events, heartbeats and metrics use.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Probe => "probe",
            Stage::Crop => "crop",
            Stage::Caption => "caption",
            Stage::Summarize => "summarize",
            Stage::Generate => "generate",
            Stage::Score => "score",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL.into_iter().find(|stage| stage.name() == s).ok_or_else(|| {
            format!("unknown stage `{s}` (one of probe, crop, caption, summarize, generate, score)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for stage in Stage::ALL {
            assert_eq!(stage.name().parse::<Stage>().unwrap(), stage);
            assert_eq!(serde_json::to_string(&stage).unwrap(), format!("\"{stage}\""));
        }
        assert!("crops".parse::<Stage>().is_err());
    }
}
