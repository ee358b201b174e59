//! Stage 3, second half: the neuron's activation on every generated image and each
//! image's similarity to the neuron's top images, then the candidates' rank scores,
//! similarity weights and final scores (`dnd_core::scoring`).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;

use crate::activations::pooled_activations_cached;
use crate::error::PipelineError;
use crate::units::Readout;
use crate::workbench::Workbench;
use dnd_core::scoring::{GeneratedImage, image_positions, mean_cosine, score_candidates};
use dnd_core::{CandidateScore, Pooling, ScoringConfig};

/// What the models measured on a task's images.
pub struct Measurements {
    /// Per generated image (request order), the pooled activation of every unit.
    pub activations: Vec<Vec<f32>>,
    dim: usize,
    /// Embedding of each distinct top image, by hash.
    top: HashMap<String, Vec<f32>>,
    /// Embeddings of the generated images, row-major, `dim` wide.
    generated: Vec<f32>,
}

impl Measurements {
    /// The embeddings of a neuron's top images (by hash), concatenated.
    pub fn references<'a>(&self, hashes: impl IntoIterator<Item = &'a str>) -> Vec<f32> {
        hashes.into_iter().flat_map(|h| self.top[h].iter().copied()).collect()
    }

    /// Mean cosine of generated image `request` with the concatenated `references`.
    fn similarity(&self, request: usize, references: &[f32]) -> f32 {
        let d = self.dim;
        mean_cosine(&self.generated[request * d..(request + 1) * d], references, d)[0]
    }
}

/// What the vector cache calls an image embedding.
const EMBEDDING: &str = "image-embedding";

/// Image embeddings of `images` (rows), from the cache where it has them; the rest on a
/// blocking thread, one image per call: the CLIP tower's batched numerics change in the
/// last bits with the batch's make-up, and the cache must hold one value per image,
/// whichever task computes it first.
pub(crate) async fn embed(
    bench: &Workbench,
    (images, hashes): (&[Arc<RgbImage>], &[String]),
) -> Result<Vec<Vec<f32>>, PipelineError> {
    let embedder = bench.embedder.model.clone();
    bench
        .embedder_vectors()
        .rows(EMBEDDING, hashes, |missing| {
            let images: Vec<Arc<RgbImage>> = missing.iter().map(|&i| images[i].clone()).collect();
            async move {
                tokio::task::spawn_blocking(move || -> Result<Vec<Vec<f32>>, PipelineError> {
                    let mut rows = Vec::with_capacity(images.len());
                    for image in &images {
                        let e = embedder.embed_images(std::slice::from_ref(&**image))?;
                        rows.extend(e.to_device(&Device::Cpu)?.to_vec2::<f32>()?);
                    }
                    Ok(rows)
                })
                .await?
            }
        })
        .await
}

/// Runs the target model on the generated images (the units of `readout`) and the
/// embedder on them and on the distinct top images (each with its hash), through the
/// vector cache.
pub async fn measure(
    bench: &Workbench,
    readout: &Readout,
    pooling: Pooling,
    batch: usize,
    top_images: &[(String, Arc<RgbImage>)],
    generated: (&[Arc<RgbImage>], &[String]),
) -> Result<Measurements, PipelineError> {
    let activations = pooled_activations_cached(
        bench.target_vectors(),
        &bench.target,
        generated,
        readout,
        pooling,
        batch,
    )
    .await?;
    let top_list: Vec<Arc<RgbImage>> = top_images.iter().map(|(_, i)| i.clone()).collect();
    let top_hashes: Vec<String> = top_images.iter().map(|(h, _)| h.clone()).collect();
    let top_rows = embed(bench, (&top_list, &top_hashes)).await?;
    let generated_rows = embed(bench, generated).await?;
    let dim = top_rows.first().or(generated_rows.first()).map_or(0, Vec::len);
    let top = top_images.iter().zip(top_rows).map(|((h, _), row)| (h.clone(), row)).collect();
    Ok(Measurements { activations, dim, top, generated: generated_rows.concat() })
}

/// One neuron's candidates, scored.
pub struct NeuronScores {
    /// Every generated image of every candidate, candidate by candidate, image `i` of a
    /// concept at its position `i`.
    pub images: Vec<GeneratedImage>,
    /// The request (index into the task's generated images) of each of `images`.
    pub requests: Vec<usize>,
    /// Each image's position in the neuron's ranking of all of them.
    pub positions: Vec<usize>,
    pub candidates: Vec<CandidateScore>,
}

/// Scores a neuron's candidates from their images' activations and similarities.
/// `column` is where the neuron is in the measured activations (its index, or its place in
/// the task's [`crate::units::Readout`]); `requests[c]` are candidate `c`'s images;
/// `references` the embeddings of the neuron's top images.
pub fn score_neuron(
    column: usize,
    requests: &[Vec<usize>],
    measured: &Measurements,
    references: &[f32],
    scoring: &ScoringConfig,
) -> NeuronScores {
    let mut images = Vec::new();
    let mut image_requests = Vec::new();
    for (c, concept_requests) in requests.iter().enumerate() {
        for &r in concept_requests {
            images.push(GeneratedImage {
                candidate: c,
                activation: measured.activations[r][column],
                similarity: measured.similarity(r, references),
            });
            image_requests.push(r);
        }
    }
    let candidates = score_candidates(requests.len(), &images, scoring);
    let positions = image_positions(&images);
    NeuronScores { images, requests: image_requests, positions, candidates }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_whose_images_excite_the_neuron_wins() {
        // Two generated images per candidate; channel 1 fires on candidate 1's images.
        let measured = Measurements {
            activations: vec![vec![9.0, 0.1], vec![9.0, 0.2], vec![0.0, 5.0], vec![0.0, 4.0]],
            dim: 2,
            top: [("t".to_string(), vec![1.0, 0.0])].into(),
            generated: vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
        };
        let references = measured.references(["t"]);
        assert_eq!(references, [1.0, 0.0]);
        let scoring = ScoringConfig::default();
        let scored = score_neuron(1, &[vec![0, 1], vec![2, 3]], &measured, &references, &scoring);
        assert_eq!(scored.requests, [0, 1, 2, 3]);
        assert_eq!(scored.images[2].activation, 5.0);
        assert!((scored.images[0].similarity - 1.0).abs() < 1e-6);
        assert_eq!(scored.positions, [3, 2, 0, 1]);
        let winner = scored.candidates.iter().find(|s| s.final_rank == 0).unwrap();
        assert_eq!(winner.candidate, 1);
    }
}
