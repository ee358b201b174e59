//! Screening of a neuron's candidates before stage 3 spends its images on them (opt-in):
//! successive halving with one round.
//!
//! Every candidate first gets its first `first_images` images (the same seeds the full
//! method uses, so nothing is generated twice), and all candidates are scored on those.
//! Only the best `keep` share of them (never fewer than the labels reported)
//! get the rest of their images; the others keep the images they have, still take part in
//! the ranking of all images as the full method's would, and rank after every survivor.
//!
//! This is a heuristic, not a bound: no rule that is safe whatever the remaining images
//! do can drop anything, because a candidate's similarity weight can still move from 0 to
//! 1 with one image in the overall top. How often it agrees with the full method, and
//! what it saves, is measured on the synthetic zoo (docs/benchmarks.md).

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::scoring::CandidateScore;

/// `[generator.screening]`: off unless `first_images` is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Screening {
    /// Images each candidate gets before the screening (0: no screening).
    pub first_images: usize,
    /// Share of the candidates, best first by their screening scores, that get the rest.
    pub keep: f64,
}

impl Default for Screening {
    fn default() -> Self {
        Self { first_images: 0, keep: 0.5 }
    }
}

impl Screening {
    pub fn enabled(&self) -> bool {
        self.first_images > 0
    }

    pub fn is_off(&self) -> bool {
        !self.enabled()
    }

    pub fn validate(&self, images_per_concept: usize) -> Result<(), CoreError> {
        if self.enabled() && self.first_images >= images_per_concept {
            return Err(CoreError::invalid(
                "generator.screening.first_images",
                format!(
                    "must be below images_per_concept ({images_per_concept}) to save anything; \
                     0 turns screening off"
                ),
            ));
        }
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(CoreError::invalid(
                "generator.screening.keep",
                "must be a share in (0, 1], e.g. 0.5 for the better half",
            ));
        }
        Ok(())
    }

    /// The candidates (indices, in candidate order) that get the rest of their images:
    /// the first `max(ceil(keep * N), labels)` of the screening's final order.
    pub fn survivors(&self, screened: &[CandidateScore], labels: usize) -> Vec<usize> {
        let n = screened.len();
        let kept = ((self.keep * n as f64).ceil() as usize).max(labels).min(n);
        let mut out: Vec<usize> =
            screened.iter().filter(|s| s.final_rank < kept).map(|s| s.candidate).collect();
        out.sort_unstable();
        out
    }
}

/// Puts every candidate outside `survivors` after all survivors in the final order,
/// keeping the order within each group (scores of the full set of images are compared
/// only among candidates that had all their images).
pub fn rank_survivors_first(scores: &mut [CandidateScore], survivors: &[usize]) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let dropped = |c: usize| !survivors.contains(&scores[c].candidate);
    order.sort_by_key(|&c| (dropped(c), scores[c].final_rank));
    for (rank, &c) in order.iter().enumerate() {
        scores[c].final_rank = rank;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::{GeneratedImage, ScoringConfig, score_candidates};

    fn image(candidate: usize, activation: f32) -> GeneratedImage {
        GeneratedImage { candidate, activation, similarity: 0.5 }
    }

    #[test]
    fn keeps_the_better_share_and_at_least_the_labels() {
        // Candidate c's images activate 10 - c: the order is 0, 1, 2, ...
        let images: Vec<GeneratedImage> = (0..6)
            .flat_map(|c| (0..2).map(move |i| image(c, 10.0 - c as f32 - 0.1 * i as f32)))
            .collect();
        let scores = score_candidates(6, &images, &ScoringConfig::default());
        let half = Screening { first_images: 2, keep: 0.5 };
        assert_eq!(half.survivors(&scores, 1), vec![0, 1, 2]);
        assert_eq!(half.survivors(&scores, 4), vec![0, 1, 2, 3], "the labels at least");
        let all = Screening { first_images: 2, keep: 1.0 };
        assert_eq!(all.survivors(&scores, 3).len(), 6);
    }

    #[test]
    fn dropped_candidates_rank_after_survivors() {
        let images = vec![image(0, 1.0), image(1, 9.0), image(2, 5.0)];
        let mut scores = score_candidates(3, &images, &ScoringConfig::default());
        assert_eq!(scores[1].final_rank, 0);
        rank_survivors_first(&mut scores, &[0, 2]);
        let ranks: Vec<usize> = scores.iter().map(|s| s.final_rank).collect();
        assert_eq!(ranks, vec![1, 2, 0]);
    }

    #[test]
    fn settings_that_save_nothing_are_rejected() {
        assert!(Screening { first_images: 10, keep: 0.5 }.validate(10).is_err());
        assert!(Screening { first_images: 3, keep: 0.0 }.validate(10).is_err());
        assert!(Screening { first_images: 3, keep: 0.5 }.validate(10).is_ok());
        assert!(Screening::default().validate(10).is_ok());
    }
}
