//! Sets of neuron ids written the way users type them: `0..64,100,200..210`.

use std::fmt;
use std::str::FromStr;

use crate::error::CoreError;

/// A sorted set of neuron (channel) ids; `..` ranges are end-exclusive, as in Rust.
/// Serialises as its range form, the way users write it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NeuronSet {
    ids: Vec<usize>,
}

impl NeuronSet {
    pub fn ids(&self) -> &[usize] {
        &self.ids
    }

    pub fn contains(&self, id: usize) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Checks every id against the layer's width.
    pub fn check_within(&self, layer: &str, width: usize) -> Result<(), CoreError> {
        match self.ids.last() {
            Some(&max) if max >= width => Err(CoreError::invalid(
                "neurons",
                format!(
                    "neuron {max} does not exist in `{layer}`, which has {width} neurons (0..{width})"
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl FromStr for NeuronSet {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |part: &str, why: &str| {
            CoreError::invalid(
                "neurons",
                format!("`{part}` {why}; write ids and end-exclusive ranges like `0..64,100`"),
            )
        };
        let mut ids = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once("..") {
                let a: usize =
                    a.trim().parse().map_err(|_| bad(part, "has a start that is not a number"))?;
                let b: usize =
                    b.trim().parse().map_err(|_| bad(part, "has an end that is not a number"))?;
                if a >= b {
                    return Err(bad(part, "is empty"));
                }
                ids.extend(a..b);
            } else {
                ids.push(part.parse().map_err(|_| bad(part, "is not a neuron id"))?);
            }
        }
        if ids.is_empty() {
            return Err(bad(s, "names no neuron"));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Self { ids })
    }
}

impl TryFrom<String> for NeuronSet {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<NeuronSet> for String {
    fn from(set: NeuronSet) -> Self {
        set.to_string()
    }
}

impl fmt::Display for NeuronSet {
    /// The shortest range form, e.g. `0..64,100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.ids.len() {
            let start = self.ids[i];
            let mut end = start + 1;
            while i + 1 < self.ids.len() && self.ids[i + 1] == end {
                end += 1;
                i += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end - start == 1 {
                write!(f, "{start}")?
            } else {
                write!(f, "{start}..{end}")?
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_ids() {
        let s: NeuronSet = "5, 0..3,2,10..12".parse().unwrap();
        assert_eq!(s.ids(), &[0, 1, 2, 5, 10, 11]);
        assert_eq!(s.to_string(), "0..3,5,10..12");
        assert!(s.contains(10) && !s.contains(3));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"0..3,5,10..12\"");
        assert_eq!(serde_json::from_str::<NeuronSet>(&json).unwrap(), s);
        assert!(serde_json::from_str::<NeuronSet>("\"3..1\"").is_err());
    }

    #[test]
    fn rejects_nonsense_with_a_useful_message() {
        for bad in ["", "a", "3..1", "1..x", "..4"] {
            let err = bad.parse::<NeuronSet>().unwrap_err().to_string();
            assert!(err.contains("neurons"), "{err}");
        }
        let s: NeuronSet = "0..70".parse().unwrap();
        let err = s.check_within("layer1", 64).unwrap_err().to_string();
        assert!(err.contains("neuron 69") && err.contains("64 neurons"), "{err}");
    }
}
