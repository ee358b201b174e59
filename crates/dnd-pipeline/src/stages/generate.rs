//! Stage 3, first half: the images to generate for a task's candidates. Image `i` of a
//! concept comes from seed `seed + i`, so a concept's images are the same wherever it
//! appears; each distinct (prompt, seed) is generated once per task, through the image
//! cache ([`crate::Workbench::generated`]).

use std::collections::HashMap;

use dnd_models::{GenerationConfig, ImageRequest};

use crate::stages::summarize::Labelling;

/// How many images each candidate of each neuron gets: `counts[neuron][candidate]`.
pub type ImageCounts = Vec<Vec<usize>>;

/// `per_concept` images for every candidate of every neuron.
pub fn uniform_counts(labelling: &[Labelling], per_concept: usize) -> ImageCounts {
    labelling.iter().map(|l| vec![per_concept; l.candidates.len()]).collect()
}

/// Every distinct (prompt, seed) the task's candidates need, and where each is.
#[derive(Debug, Default)]
pub struct ImageRequests {
    /// In first-needed order.
    pub requests: Vec<ImageRequest>,
    index: HashMap<(String, u64), usize>,
    seed: u64,
}

impl ImageRequests {
    /// The requests for `counts[k][c]` images of candidate `c` of neuron `k`.
    pub fn new(
        labelling: &[Labelling],
        counts: &ImageCounts,
        sampling: &GenerationConfig,
        seed: u64,
    ) -> Self {
        let mut out = Self { seed, ..Self::default() };
        for (l, counts) in labelling.iter().zip(counts) {
            for (concept, &count) in l.candidates.iter().zip(counts) {
                let prompt = sampling.prompt(concept);
                for seed in out.seeds(count) {
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

    fn seeds(&self, count: usize) -> impl Iterator<Item = u64> + use<> {
        let seed = self.seed;
        (0..count as u64).map(move |i| seed.wrapping_add(i))
    }

    /// The indices into [`Self::requests`] of a concept's first `count` images, image `i`
    /// at position `i`.
    pub fn of_concept(
        &self,
        sampling: &GenerationConfig,
        concept: &str,
        count: usize,
    ) -> Vec<usize> {
        let prompt = sampling.prompt(concept);
        self.seeds(count).map(|seed| self.index[&(prompt.clone(), seed)]).collect()
    }

    /// Each neuron's candidates' images: `[neuron][candidate]` lists of request indices.
    pub fn per_candidate(
        &self,
        labelling: &[Labelling],
        counts: &ImageCounts,
        sampling: &GenerationConfig,
    ) -> Vec<Vec<Vec<usize>>> {
        labelling
            .iter()
            .zip(counts)
            .map(|(l, counts)| {
                l.candidates
                    .iter()
                    .zip(counts)
                    .map(|(c, &count)| self.of_concept(sampling, c, count))
                    .collect()
            })
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
        let counts = uniform_counts(&neurons, 3);
        let requests = ImageRequests::new(&neurons, &counts, &sampling, 10);
        assert_eq!(requests.requests.len(), 6, "two concepts, three seeds each");
        let stripes = requests.of_concept(&sampling, "stripes", 3);
        assert_eq!(stripes, [3, 4, 5]);
        let seeds: Vec<u64> = stripes.iter().map(|&r| requests.requests[r].seed).collect();
        assert_eq!(seeds, [10, 11, 12]);
        assert_eq!(requests.requests[0].prompt, sampling.prompt("red circles"));
    }

    #[test]
    fn a_concept_gets_the_most_images_any_neuron_asks_for() {
        let sampling = GenerationConfig::default();
        let neurons = [labelled(&["stripes", "dots"]), labelled(&["stripes"])];
        let counts = vec![vec![1, 2], vec![3]];
        let requests = ImageRequests::new(&neurons, &counts, &sampling, 0);
        assert_eq!(requests.requests.len(), 5, "stripes 3 images, dots 2");
        let lists = requests.per_candidate(&neurons, &counts, &sampling);
        assert_eq!(lists[0][0], [0], "neuron 0 scores stripes on its first image only");
        assert_eq!(lists[1][0], [0, 3, 4]);
        assert_eq!(lists[0][1], [1, 2]);
    }
}
