//! A probe set of the world on disk: rendered images and the scenes behind them, so that
//! anything (dnd, a baseline, a person) can look at the images and score against the
//! exact ground truth.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::SynthError;
use crate::render::render;
use crate::scene::Scene;

/// File with one scene (JSON) per line, in image order, beside the images.
pub const SCENES_FILE: &str = "scenes.jsonl";

/// Which probe set: image `i` is the scene sampled from ChaCha8 seeded `seed + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSetSpec {
    pub count: usize,
    pub size: u32,
    pub seed: u64,
}

impl ProbeSetSpec {
    /// Reads `synth:world?count=2000&size=96&seed=1` (every key optional; defaults 1000
    /// images of 96 px from seed 0); `None` when `spec` is not a `synth:` reference.
    pub fn parse(spec: &str) -> Option<Result<Self, String>> {
        let rest = spec.strip_prefix("synth:")?;
        let (world, query) = rest.split_once('?').unwrap_or((rest, ""));
        if world != "world" {
            return Some(Err(format!(
                "`{spec}`: the only synthetic probe set is synth:world?count=N&size=S&seed=K"
            )));
        }
        let mut out = ProbeSetSpec { count: 1000, size: 96, seed: 0 };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || format!("`{spec}`: `{pair}` needs a whole number, e.g. count=2000");
            match key {
                "count" => {
                    out.count = match value.parse() {
                        Ok(v) => v,
                        Err(_) => return Some(Err(bad())),
                    }
                }
                "size" => {
                    out.size = match value.parse() {
                        Ok(v) => v,
                        Err(_) => return Some(Err(bad())),
                    }
                }
                "seed" => {
                    out.seed = match value.parse() {
                        Ok(v) => v,
                        Err(_) => return Some(Err(bad())),
                    }
                }
                _ => {
                    return Some(Err(format!("`{spec}`: unknown key `{key}` (count, size, seed)")));
                }
            }
        }
        if out.count == 0 || out.size < 8 {
            return Some(Err(format!("`{spec}`: count must be at least 1 and size at least 8")));
        }
        Some(Ok(out))
    }

    /// A directory name that says which probe set it is.
    pub fn dir_name(&self) -> String {
        format!("world-{}x{}px-seed{}", self.count, self.size, self.seed)
    }

    /// Every image as (file name, PNG bytes), and the scenes file, in memory.
    pub fn render_files(&self) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
        let scenes: Vec<Scene> = (0..self.count).map(|i| self.scene(i)).collect();
        let images = scenes
            .par_iter()
            .enumerate()
            .map(|(i, scene)| {
                let mut png = Vec::new();
                image::DynamicImage::ImageRgb8(render(scene, self.size, self.size).image)
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .expect("encoding PNG to memory cannot fail");
                (Self::file_name(i), png)
            })
            .collect();
        let mut jsonl = Vec::new();
        for scene in &scenes {
            serde_json::to_writer(&mut jsonl, scene).expect("scenes serialise");
            jsonl.push(b'\n');
        }
        (images, jsonl)
    }

    /// The scene of image `i`.
    pub fn scene(&self, i: usize) -> Scene {
        Scene::sample(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(i as u64)))
    }

    /// The file name of image `i`.
    pub fn file_name(i: usize) -> String {
        format!("{i:05}.png")
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SynthError + '_ {
    move |e| SynthError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Writes `dir/NNNNN.png` and `dir/scenes.jsonl`.
pub fn write_probe_set(dir: &Path, spec: &ProbeSetSpec) -> Result<(), SynthError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (images, scenes) = spec.render_files();
    for (name, png) in images {
        let path = dir.join(name);
        std::fs::write(&path, png).map_err(io(&path))?;
    }
    let path = dir.join(SCENES_FILE);
    std::fs::write(&path, scenes).map_err(io(&path))
}

/// The scenes of a probe set written by [`write_probe_set`], by file name.
pub fn read_scenes(dir: &Path) -> Result<Vec<(String, Scene)>, SynthError> {
    let path: PathBuf = dir.join(SCENES_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let scene = serde_json::from_str(line).map_err(|e| SynthError::Io {
                path: path.clone(),
                reason: format!("line {}: {e}", i + 1),
            })?;
            Ok((ProbeSetSpec::file_name(i), scene))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_set_round_trips_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ProbeSetSpec { count: 5, size: 32, seed: 9 };
        write_probe_set(dir.path(), &spec).unwrap();
        let scenes: Vec<Scene> = (0..5).map(|i| spec.scene(i)).collect();
        let back = read_scenes(dir.path()).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back[3], (ProbeSetSpec::file_name(3), scenes[3].clone()));
        let image = image::open(dir.path().join("00003.png")).unwrap().to_rgb8();
        assert_eq!(image, render(&scenes[3], 32, 32).image);
        assert_eq!(
            spec.scene(3),
            ProbeSetSpec { count: 1, ..spec }.scene(3),
            "image i is scene seed + i, whatever the count"
        );
    }

    #[test]
    fn probe_set_references_parse_with_defaults_and_clear_errors() {
        assert!(ProbeSetSpec::parse("/data/images").is_none());
        assert_eq!(
            ProbeSetSpec::parse("synth:world").unwrap().unwrap(),
            ProbeSetSpec { count: 1000, size: 96, seed: 0 }
        );
        assert_eq!(
            ProbeSetSpec::parse("synth:world?count=20&seed=3").unwrap().unwrap(),
            ProbeSetSpec { count: 20, size: 96, seed: 3 }
        );
        for bad in
            ["synth:mars", "synth:world?count=x", "synth:world?colour=red", "synth:world?count=0"]
        {
            assert!(ProbeSetSpec::parse(bad).unwrap().is_err(), "{bad}");
        }
    }
}
