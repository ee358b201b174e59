//! Stage 3, first half: the images to generate for a task's candidates. Image `i` of a
//! concept comes from seed `seed + i`, so a concept's images are the same wherever it
//! appears; each distinct (prompt, seed) is generated once per task, through the image
//! cache ([`crate::Workbench::generated`]).

use std::collections::HashMap;

use dnd_models::{GenerationConfig, ImageRequest};

use crate::stages::summarize::Labelling;

/// Every distinct (prompt, seed) the task's candidates need, and where each is.
#[derive(Debug, Default)]
pub struct ImageRequests {
    /// In first-needed order.
    pub requests: Vec<ImageRequest>,
    index: HashMap<(String, u64), usize>,
    per_concept: usize,
    seed: u64,
}

impl ImageRequests {
    /// The requests for `per_concept` images of every candidate of every neuron.
    pub fn new(
        labelling: &[Labelling],
        sampling: &GenerationConfig,
        per_concept: usize,
        seed: u64,
    ) -> Self {
        let mut out = Self { per_concept, seed, ..Self::default() };
        for l in labelling {
            for concept in &l.candidates {
                let prompt = sampling.prompt(concept);
                for i in 0..per_concept as u64 {
                    let seed = seed.wrapping_add(i);
                    let requests = &mut out.requests;
                    out.index.entry((prompt.clone(), seed)).or_insert_with(|| {
                        requests.push(ImageRequest { prompt: prompt.clone(), seed });
                        requests.len() - 1
                    });
                }
            }
        }
        out
    }

    /// The indices into [`Self::requests`] of a concept's images, image `i` at position `i`.
    pub fn of_concept(&self, sampling: &GenerationConfig, concept: &str) -> Vec<usize> {
        let prompt = sampling.prompt(concept);
        (0..self.per_concept as u64)
            .map(|i| self.index[&(prompt.clone(), self.seed.wrapping_add(i))])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(candidates: &[&str]) -> Labelling {
        Labelling {
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_concept_shared_by_neurons_is_requested_once() {
        let sampling = GenerationConfig::default();
        let neurons = [labelled(&["red circles", "stripes"]), labelled(&["stripes"])];
        let requests = ImageRequests::new(&neurons, &sampling, 3, 10);
        assert_eq!(requests.requests.len(), 6, "two concepts, three seeds each");
        let stripes = requests.of_concept(&sampling, "stripes");
        assert_eq!(stripes, [3, 4, 5]);
        let seeds: Vec<u64> = stripes.iter().map(|&r| requests.requests[r].seed).collect();
        assert_eq!(seeds, [10, 11, 12]);
        assert_eq!(requests.requests[0].prompt, sampling.prompt("red circles"));
    }
}
