//! Typed identifiers: what a job, a task, a layer and a neuron are called, from the job
//! file to the proto and the results tables. Each is a thin wrapper that serialises as
//! the bare value, so `plan.json`, `job.json` and the proto keep their shapes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A neuron (channel, or fc unit) of a layer: its index along the layer's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NeuronId(u32);

impl NeuronId {
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The channel index, for indexing a layer's activations.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// As the results tables store it (Arrow `Int32`, the `neuron` column).
    pub const fn to_i32(self) -> i32 {
        self.0 as i32
    }

    /// As the proto carries it.
    pub const fn to_u32(self) -> u32 {
        self.0
    }
}

impl From<u32> for NeuronId {
    fn from(index: u32) -> Self {
        Self(index)
    }
}

impl fmt::Display for NeuronId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Generates a string identifier with the usual conversions.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        // Derefs to the bare string, so an id passes wherever a `&str` name is expected.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_string())
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id! {
    /// A tap of the target model, as users name it: `layer4`, `fc`.
    LayerName
}

string_id! {
    /// A task of a job's plan: `probe-00003`, `layer4-00001`.
    TaskId
}

string_id! {
    /// A job: its directory under `<store>/jobs/`.
    JobName
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialise_as_their_bare_values() {
        let neurons = vec![NeuronId::new(3), NeuronId::new(12)];
        assert_eq!(serde_json::to_string(&neurons).unwrap(), "[3,12]");
        let back: Vec<NeuronId> = serde_json::from_str("[3,12]").unwrap();
        assert_eq!(back, neurons);
        assert_eq!((neurons[1].index(), neurons[1].to_i32()), (12, 12));
        let layer = LayerName::from("layer4");
        assert_eq!(serde_json::to_string(&layer).unwrap(), "\"layer4\"");
        assert_eq!(layer, "layer4");
        assert_eq!(TaskId::new("layer4-00001").to_string(), "layer4-00001");
    }
}
