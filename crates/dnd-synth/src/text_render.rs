//! The world's text-to-image model: renders varied scenes that contain what a prompt names.

use dnd_models::{Generator, ImageRequest, ModelError};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::SynthError;
use crate::render::{Rendered, render};
use crate::scene::Scene;
use crate::spec::SceneSpec;

/// Stands in for a text-to-image model in the synthetic world.
///
/// The prompt is read with the world's vocabulary (the template around the concept, e.g.
/// "One realistic image of {concept}", and any other unknown word is ignored): "green
/// triangles" gives scenes of one to three green triangles (of any fill, size and place)
/// on a random background, as a text-to-image model draws what it is asked for and
/// nothing else; "striped background" a striped background with random objects; "red
/// circles and blue squares" both kinds of object. A prompt
/// without any word of the world gives a random scene of the world. The image depends only
/// on the prompt, the seed (ChaCha8) and the size: same inputs, same pixels, whatever the
/// batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRenderer {
    width: u32,
    height: u32,
}

impl TextRenderer {
    pub fn new(width: u32, height: u32) -> Result<Self, SynthError> {
        if width == 0 || height == 0 {
            return Err(SynthError::EmptyImage { width, height });
        }
        Ok(Self { width, height })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The scene behind the image of (prompt, seed); independent of the image size.
    pub fn scene(&self, prompt: &str, seed: u64) -> Scene {
        SceneSpec::from_text(prompt).sample(&mut ChaCha8Rng::seed_from_u64(seed))
    }

    /// The scene of (prompt, seed) and its rendering, with the ground truth masks.
    pub fn render(&self, prompt: &str, seed: u64) -> (Scene, Rendered) {
        let scene = self.scene(prompt, seed);
        let rendered = render(&scene, self.width, self.height);
        (scene, rendered)
    }
}

impl Generator for TextRenderer {
    fn generate(&self, requests: &[ImageRequest]) -> Result<Vec<RgbImage>, ModelError> {
        Ok(requests.iter().map(|r| self.render(&r.prompt, r.seed).1.image).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use dnd_models::GenerationConfig;

    use super::*;
    use crate::concept::{Concept, all_concepts};
    use crate::scene::MAX_OBJECTS;
    use crate::vocab::{Colour, Shape, Texture};

    fn request(prompt: &str, seed: u64) -> ImageRequest {
        ImageRequest { prompt: prompt.to_string(), seed }
    }

    /// A concept counts as shown when its mask covers at least 0.5% of the image.
    fn shows(renderer: &TextRenderer, prompt: &str, seed: u64, concept: Concept) -> bool {
        let (scene, rendered) = renderer.render(prompt, seed);
        let pixels = concept.mask(&scene, &rendered).expect("the scene's own rendering").count();
        pixels * 200 >= (renderer.width() * renderer.height()) as usize
    }

    #[test]
    fn images_show_the_requested_concept() {
        let renderer = TextRenderer::new(64, 64).unwrap();
        let template = GenerationConfig::default();
        let blue_star = Concept::ColourShape(Colour::Blue, Shape::Star);
        for seed in 0..50 {
            assert!(shows(&renderer, "blue stars", seed, blue_star), "seed {seed}");
            assert!(shows(
                &renderer,
                &template.prompt("green triangles"),
                seed,
                Concept::ColourShape(Colour::Green, Shape::Triangle)
            ));
            assert_eq!(
                renderer.scene("a striped background", seed).background.texture,
                Texture::Stripes
            );
            let both = "red circles and blue squares";
            assert!(
                shows(&renderer, both, seed, Concept::ColourShape(Colour::Red, Shape::Circle)),
                "{both}, seed {seed}"
            );
            assert!(
                shows(&renderer, both, seed, Concept::ColourShape(Colour::Blue, Shape::Square)),
                "{both}, seed {seed}"
            );
        }
    }

    #[test]
    fn every_concept_of_the_world_can_be_rendered() {
        let renderer = TextRenderer::new(64, 64).unwrap();
        let template = GenerationConfig::default();
        for concept in all_concepts() {
            for seed in 0..5 {
                let prompt = template.prompt(&concept.phrase());
                assert!(shows(&renderer, &prompt, seed, concept), "`{prompt}`, seed {seed}");
            }
        }
    }

    #[test]
    fn images_are_deterministic_and_vary_with_the_seed() {
        let renderer = TextRenderer::new(48, 32).unwrap();
        let requests: Vec<ImageRequest> = (0..10).map(|seed| request("blue stars", seed)).collect();
        let images = renderer.generate(&requests).unwrap();
        assert!(images.iter().all(|i| i.dimensions() == (48, 32)));
        assert_eq!(
            images.iter().map(|i| i.as_raw()).collect::<HashSet<_>>().len(),
            10,
            "seeds give different images"
        );
        // The same request alone, or in another batch order, gives the same pixels.
        let reversed: Vec<ImageRequest> = requests.iter().rev().cloned().collect();
        let mut again = renderer.generate(&reversed).unwrap();
        again.reverse();
        assert_eq!(again, images);
        assert!(renderer.generate(&[]).unwrap().is_empty());
    }

    #[test]
    fn unknown_prompts_give_random_scenes_of_the_world() {
        let renderer = TextRenderer::new(64, 64).unwrap();
        let scenes: HashSet<String> = (0..10)
            .map(|seed| {
                let scene = renderer.scene("a photograph of the sea at dawn", seed);
                assert!((1..=MAX_OBJECTS).contains(&scene.objects.len()));
                format!("{scene:?}")
            })
            .collect();
        assert_eq!(scenes.len(), 10);
        assert_eq!(renderer.scene("the sea", 3), Scene::sample(&mut ChaCha8Rng::seed_from_u64(3)));
    }

    #[test]
    fn empty_sizes_are_refused() {
        assert_eq!(TextRenderer::new(0, 64), Err(SynthError::EmptyImage { width: 0, height: 64 }));
    }
}
