//! The ceiling of `dnd bench quality`'s CoSy-style AUC: the AUC that a perfect detector of
//! each planted concept would get, with the benchmark's own images (32 rendered from the
//! planted description, seeds 1,000,000+; 256 control scenes, seeds 2,000,000+; 96 px) and
//! as activation the share of the image the concept's exact mask covers (what a planted
//! channel is trained to follow, mean-pooled as dnd pools). Control scenes contain common
//! concepts too (half of them show a striped object), so a perfect detector of a common
//! concept stays well below 1.
//!
//! `cargo run --release -p dnd-synth --example oracle_auc [MODEL_DIR]`

use dnd_core::stats::{auc, widen};
use dnd_synth::planted::{PlantedKind, PlantedSpec, read_planted};
use dnd_synth::{Scene, TextRenderer, render};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const SIZE: u32 = 96;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crates/dnd-synth/zoo/target".into());
    let planted = read_planted(std::path::Path::new(&dir))?;
    let renderer = TextRenderer::new(SIZE, SIZE)?;
    let controls: Vec<Scene> =
        (0..256).map(|i| Scene::sample(&mut ChaCha8Rng::seed_from_u64(2_000_000 + i))).collect();
    let mut singles = Vec::new();
    println!(
        "{:<7} {:>6}  {:<45} {:>10} {:>20}",
        "layer", "neuron", "planted", "oracle AUC", "controls showing it"
    );
    for p in planted.iter().filter(|p| p.kind != PlantedKind::Class) {
        let spec = PlantedSpec {
            layer: 4,
            neuron: 0,
            kind: p.kind,
            concepts: p.parsed_concepts(),
            weight: 1.0,
        };
        let share = |s: &Scene| -> Result<f32, Box<dyn std::error::Error>> {
            let rendered = render(s, SIZE, SIZE);
            Ok(spec.mask(s, &rendered)?.count() as f32 / (SIZE * SIZE) as f32)
        };
        let negatives: Vec<f32> = controls.iter().map(share).collect::<Result<_, _>>()?;
        let positives: Vec<f32> = (0..32)
            .map(|i| share(&renderer.scene(&p.description, 1_000_000 + i)))
            .collect::<Result<_, _>>()?;
        let showing =
            negatives.iter().filter(|&&v| v > 0.0).count() as f64 / negatives.len() as f64;
        let value = auc(&widen(&positives), &widen(&negatives));
        if p.kind == PlantedKind::Single {
            singles.push(value);
        }
        println!(
            "{:<7} {:>6}  {:<45} {:>10.3} {:>19.0}%",
            p.layer,
            p.neuron,
            p.description,
            value,
            100.0 * showing
        );
    }
    println!(
        "\nmean over single-concept channels: {:.3}",
        singles.iter().sum::<f64>() / singles.len().max(1) as f64
    );
    Ok(())
}
