//! Stage 3: choosing the best candidate concept of a neuron from its generated images.
//!
//! Every candidate's generated images are ranked together by the neuron's activation; a
//! candidate whose images rank high is likely what the neuron detects. The rank score is
//! then weighted by how similar the candidate's best images look to the neuron's real top
//! images, so that a concept that only triggers the neuron by accident loses.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// How a candidate's image positions become one rank score (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankScore {
    /// Mean of the squares of the candidate's `beta` best positions (the method's default).
    #[default]
    TopkSqMean,
    /// Mean position.
    Mean,
    /// Median position.
    Median,
    /// Mean of the squared positions.
    SqMean,
}

impl RankScore {
    pub const ALL: [RankScore; 4] =
        [RankScore::TopkSqMean, RankScore::Mean, RankScore::Median, RankScore::SqMean];

    /// The score of ascending `positions`; `None` for a candidate without images.
    pub fn of(self, positions: &[usize], beta: usize) -> Option<f64> {
        if positions.is_empty() {
            return None;
        }
        let sq = |p: &usize| (*p as f64) * (*p as f64);
        let n = positions.len() as f64;
        Some(match self {
            RankScore::TopkSqMean => {
                let best = &positions[..beta.min(positions.len())];
                best.iter().map(sq).sum::<f64>() / best.len() as f64
            }
            RankScore::Mean => positions.iter().map(|&p| p as f64).sum::<f64>() / n,
            RankScore::Median => {
                let m = positions.len() / 2;
                if positions.len() % 2 == 1 {
                    positions[m] as f64
                } else {
                    (positions[m - 1] + positions[m]) as f64 / 2.0
                }
            }
            RankScore::SqMean => positions.iter().map(sq).sum::<f64>() / n,
        })
    }
}

/// Stage 3's numbers; defaults are the method's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// The rank score that orders candidates.
    pub rank_score: RankScore,
    /// How many best positions `topk-sq-mean` averages.
    pub beta: usize,
    /// Generated images in the overall top this-many positions count for the similarity weight.
    pub similarity_top: usize,
    /// Labels reported per neuron.
    pub labels: usize,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self { rank_score: RankScore::TopkSqMean, beta: 5, similarity_top: 10, labels: 3 }
    }
}

impl ScoringConfig {
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.beta == 0 {
            return Err(CoreError::invalid(
                "scoring.beta",
                "must be at least 1 (the method uses 5)",
            ));
        }
        if self.similarity_top == 0 {
            return Err(CoreError::invalid(
                "scoring.similarity_top",
                "must be at least 1 (the method uses 10)",
            ));
        }
        if self.labels == 0 {
            return Err(CoreError::invalid(
                "scoring.labels",
                "must be at least 1 (the method reports 3)",
            ));
        }
        Ok(())
    }
}

/// One generated image as scoring sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratedImage {
    /// Index of the candidate it was generated for.
    pub candidate: usize,
    /// The neuron's pooled activation on it.
    pub activation: f32,
    /// Mean cosine similarity between it and the neuron's top images.
    pub similarity: f32,
}

/// Every number stage 3 computes for one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    pub candidate: usize,
    /// 0-based positions of its images among all generated images, ascending.
    pub positions: Vec<usize>,
    pub topk_sq_mean: Option<f64>,
    pub mean: Option<f64>,
    pub median: Option<f64>,
    pub sq_mean: Option<f64>,
    /// Mean similarity of its images in the overall top `similarity_top`; -1 when none is.
    pub similarity: f64,
    /// Its place when candidates are ordered by the configured rank score (0 = best).
    pub rank_order: usize,
    /// `(N - rank_order) x (1 + similarity) / 2` ("image-products", with the similarity
    /// shifted to a weight in 0..=1; see [`similarity_weight`]).
    pub final_score: f64,
    /// Its place in the final order (0 = the top label).
    pub final_rank: usize,
}

impl CandidateScore {
    pub fn rank_score(&self, which: RankScore) -> Option<f64> {
        match which {
            RankScore::TopkSqMean => self.topk_sq_mean,
            RankScore::Mean => self.mean,
            RankScore::Median => self.median,
            RankScore::SqMean => self.sq_mean,
        }
    }
}

/// The weight a mean cosine similarity gives a candidate's rank: `(1 + similarity) / 2`,
/// 0 for a candidate none of whose images reached the top (similarity -1).
///
/// The reference multiplies by the cosine itself, which CLIP ViT-B/16 keeps well above 0
/// between any two images. Other embedders give cosines near or below 0 between images
/// that share a concept but not a scene, and a negative weight inverts the product: the
/// better a candidate's rank, the lower its score. The shift keeps the order of
/// similarities and makes every weight non-negative.
pub fn similarity_weight(similarity: f64) -> f64 {
    (1.0 + similarity) / 2.0
}

/// Orders all images by activation, descending. Ties (and NaN, which sorts last) keep
/// the input order, so equal inputs give equal positions.
pub fn image_positions(images: &[GeneratedImage]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..images.len()).collect();
    let key = |i: usize| images[i].activation;
    order.sort_by(|&a, &b| match (key(a).is_nan(), key(b).is_nan()) {
        (false, false) => key(b).total_cmp(&key(a)),
        (a_nan, b_nan) => a_nan.cmp(&b_nan),
    });
    let mut position = vec![0; images.len()];
    for (p, &i) in order.iter().enumerate() {
        position[i] = p;
    }
    position
}

/// Scores `candidates` candidates from their generated `images`. The result is in
/// candidate order; `final_rank` gives the label order. A candidate without images (its
/// generation failed) ranks last with similarity -1.
pub fn score_candidates(
    candidates: usize,
    images: &[GeneratedImage],
    config: &ScoringConfig,
) -> Vec<CandidateScore> {
    let position = image_positions(images);
    let mut positions = vec![Vec::new(); candidates];
    let mut similar = vec![Vec::new(); candidates];
    for (i, image) in images.iter().enumerate() {
        positions[image.candidate].push(position[i]);
        if position[i] < config.similarity_top {
            similar[image.candidate].push(f64::from(image.similarity));
        }
    }
    let mut scores: Vec<CandidateScore> = (0..candidates)
        .map(|c| {
            positions[c].sort_unstable();
            let p = &positions[c];
            let similarity = if similar[c].is_empty() {
                -1.0
            } else {
                similar[c].iter().sum::<f64>() / similar[c].len() as f64
            };
            CandidateScore {
                candidate: c,
                positions: p.clone(),
                topk_sq_mean: RankScore::TopkSqMean.of(p, config.beta),
                mean: RankScore::Mean.of(p, config.beta),
                median: RankScore::Median.of(p, config.beta),
                sq_mean: RankScore::SqMean.of(p, config.beta),
                similarity,
                rank_order: 0,
                final_score: 0.0,
                final_rank: 0,
            }
        })
        .collect();

    // Rank order: by the configured score, candidates without images last, ties by index.
    let mut by_rank: Vec<usize> = (0..candidates).collect();
    let rank_key = |c: usize| scores[c].rank_score(config.rank_score).unwrap_or(f64::INFINITY);
    by_rank.sort_by(|&a, &b| rank_key(a).total_cmp(&rank_key(b)).then(a.cmp(&b)));
    for (p, &c) in by_rank.iter().enumerate() {
        scores[c].rank_order = p;
        scores[c].final_score = (candidates - p) as f64 * similarity_weight(scores[c].similarity);
    }
    // Final order: by final score, ties by the better rank order.
    let mut by_final: Vec<usize> = (0..candidates).collect();
    by_final.sort_by(|&a, &b| {
        scores[b]
            .final_score
            .total_cmp(&scores[a].final_score)
            .then(scores[a].rank_order.cmp(&scores[b].rank_order))
    });
    for (p, &c) in by_final.iter().enumerate() {
        scores[c].final_rank = p;
    }
    scores
}

/// Mean cosine similarity of each row of `images` to the rows of `references`; rows are
/// unit vectors of length `dim`, so the dot product is the cosine.
pub fn mean_cosine(images: &[f32], references: &[f32], dim: usize) -> Vec<f32> {
    let Some(count) = images.len().checked_div(dim) else { return Vec::new() };
    if references.is_empty() {
        return vec![0.0; count];
    }
    let refs: Vec<&[f32]> = references.chunks_exact(dim).collect();
    images
        .chunks_exact(dim)
        .map(|v| {
            refs.iter().map(|r| v.iter().zip(*r).map(|(a, b)| a * b).sum::<f32>()).sum::<f32>()
                / refs.len() as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(candidate: usize, activation: f32, similarity: f32) -> GeneratedImage {
        GeneratedImage { candidate, activation, similarity }
    }

    #[test]
    fn rank_scores_follow_their_definitions() {
        let p = [0, 2, 3, 7, 10, 20];
        assert_eq!(RankScore::TopkSqMean.of(&p, 5), Some((0.0 + 4.0 + 9.0 + 49.0 + 100.0) / 5.0));
        assert_eq!(
            RankScore::TopkSqMean.of(&p[..2], 5),
            Some(2.0),
            "fewer images than beta use all"
        );
        assert_eq!(RankScore::Mean.of(&p, 5), Some(42.0 / 6.0));
        assert_eq!(RankScore::Median.of(&p, 5), Some(5.0));
        assert_eq!(RankScore::Median.of(&p[..5], 5), Some(3.0));
        assert_eq!(
            RankScore::SqMean.of(&p, 5),
            Some((0.0 + 4.0 + 9.0 + 49.0 + 100.0 + 400.0) / 6.0)
        );
        assert_eq!(RankScore::Mean.of(&[], 5), None);
    }

    #[test]
    fn positions_sort_by_activation_with_stable_ties_and_nan_last() {
        let images =
            [image(0, 1.0, 0.0), image(0, f32::NAN, 0.0), image(1, 3.0, 0.0), image(1, 1.0, 0.0)];
        assert_eq!(image_positions(&images), [1, 3, 0, 2]);
    }

    #[test]
    fn the_candidate_whose_images_excite_most_and_look_alike_wins() {
        // Candidate 1's images are on top and look like the top images; candidate 2 has
        // the third-best image but looks nothing alike; candidate 0 is in between.
        let config = ScoringConfig { beta: 2, similarity_top: 4, ..Default::default() };
        let images = [
            image(0, 5.0, 0.5),
            image(0, 1.0, 0.5),
            image(1, 9.0, 0.9),
            image(1, 8.0, 0.7),
            image(2, 7.0, -0.2),
            image(2, 0.5, 0.0),
        ];
        let scores = score_candidates(3, &images, &config);
        assert_eq!(scores[1].positions, [0, 1]);
        assert_eq!(scores[1].topk_sq_mean, Some(0.5));
        assert!((scores[1].similarity - 0.8).abs() < 1e-6);
        assert_eq!(scores[2].positions, [2, 5]);
        assert!((scores[2].similarity + 0.2).abs() < 1e-6);
        assert_eq!(scores[0].positions, [3, 4]);
        assert!(
            (scores[0].similarity - 0.5).abs() < 1e-6,
            "only its image at position 3 is in the top 4"
        );
        // topk-sq-mean: c0 (9+16)/2 = 12.5, c1 0.5, c2 (4+25)/2 = 14.5
        assert_eq!([scores[0].rank_order, scores[1].rank_order, scores[2].rank_order], [1, 0, 2]);
        assert!((scores[1].final_score - 3.0 * 0.9).abs() < 1e-6);
        assert!((scores[0].final_score - 2.0 * 0.75).abs() < 1e-6);
        assert!((scores[2].final_score - 1.0 * 0.4).abs() < 1e-6);
        assert_eq!([scores[0].final_rank, scores[1].final_rank, scores[2].final_rank], [1, 0, 2]);
    }

    #[test]
    fn cosines_below_zero_do_not_invert_the_rank_order() {
        // Both candidates reach the top; the better-ranked one has a slightly negative mean
        // cosine, as a small embedder gives. A raw product would put it last.
        let config = ScoringConfig { beta: 1, similarity_top: 2, ..Default::default() };
        let scores = score_candidates(2, &[image(0, 9.0, -0.02), image(1, 8.0, 0.04)], &config);
        assert_eq!([scores[0].rank_order, scores[1].rank_order], [0, 1]);
        assert!((scores[0].final_score - 2.0 * 0.49).abs() < 1e-9);
        assert_eq!([scores[0].final_rank, scores[1].final_rank], [0, 1]);
    }

    #[test]
    fn a_candidate_outside_the_top_gets_similarity_minus_one_and_one_without_images_ranks_last() {
        let config = ScoringConfig { similarity_top: 1, ..Default::default() };
        let images = [image(0, 2.0, 0.3), image(1, 1.0, 0.9)];
        let scores = score_candidates(3, &images, &config);
        assert_eq!(scores[1].similarity, -1.0);
        assert_eq!(scores[2].positions, Vec::<usize>::new());
        assert_eq!(scores[2].topk_sq_mean, None);
        assert_eq!(scores[2].rank_order, 2);
        assert_eq!(
            (scores[1].final_score, scores[2].final_score),
            (0.0, 0.0),
            "similarity -1 weighs 0"
        );
        assert_eq!(scores[0].final_rank, 0);
    }

    #[test]
    fn other_rank_scores_can_order_candidates() {
        // Candidate 0 has the best single image, candidate 1 the better mean.
        let images = [
            image(0, 10.0, 1.0),
            image(0, 0.0, 1.0),
            image(0, -1.0, 1.0),
            image(1, 9.0, 1.0),
            image(1, 8.0, 1.0),
            image(1, 7.0, 1.0),
        ];
        let top1 = ScoringConfig { beta: 1, similarity_top: 6, ..Default::default() };
        assert_eq!(score_candidates(2, &images, &top1)[0].rank_order, 0);
        let mean =
            ScoringConfig { rank_score: RankScore::Mean, similarity_top: 6, ..Default::default() };
        assert_eq!(score_candidates(2, &images, &mean)[1].rank_order, 0);
    }

    #[test]
    fn mean_cosine_of_unit_vectors() {
        let refs = [1.0, 0.0, 0.0, 1.0];
        let images = [1.0, 0.0, 0.6, 0.8];
        let sims = mean_cosine(&images, &refs, 2);
        assert!((sims[0] - 0.5).abs() < 1e-6 && (sims[1] - 0.7).abs() < 1e-6, "{sims:?}");
    }

    #[test]
    fn config_parses_kebab_case_and_rejects_zero() {
        let parsed: ScoringConfig =
            serde_json::from_str(r#"{"rank_score":"sq-mean","beta":3}"#).unwrap();
        assert_eq!(parsed.rank_score, RankScore::SqMean);
        assert_eq!(parsed.similarity_top, 10);
        assert!(ScoringConfig { beta: 0, ..Default::default() }.validate().is_err());
    }
}
