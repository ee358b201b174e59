//! Where a model's files are: a local path or a Hugging Face hub repository.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::ModelError;
use crate::weights::Checkpoint;

/// A model reference as users write it: a local directory or file, or
/// `hf:<org>/<name>[@<revision>]` resolved through the Hugging Face hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Local(PathBuf),
    Hub { repo: String, revision: String },
}

impl FromStr for ModelRef {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(rest) = s.strip_prefix("hf:") else {
            if s.is_empty() {
                return Err(ModelError::BadReference {
                    reference: s.into(),
                    reason: "it is empty".into(),
                });
            }
            return Ok(ModelRef::Local(PathBuf::from(s)));
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (rest, "main"),
        };
        let valid = |part: &str| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2
            || !parts.iter().all(|p| valid(p))
            || parts.iter().any(|p| p.starts_with('.'))
        {
            return Err(ModelError::BadReference {
                reference: s.into(),
                reason: "write a hub model as hf:<org>/<name>[@<revision>], e.g. hf:timm/resnet50.tv_in1k".into(),
            });
        }
        if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
            return Err(ModelError::BadReference {
                reference: s.into(),
                reason: "the revision after @ is not valid".into(),
            });
        }
        Ok(ModelRef::Hub { repo: repo.into(), revision: revision.into() })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Local(p) => write!(f, "{}", p.display()),
            ModelRef::Hub { repo, revision } if revision == "main" => write!(f, "hf:{repo}"),
            ModelRef::Hub { repo, revision } => write!(f, "hf:{repo}@{revision}"),
        }
    }
}

/// The local files of a model: its weights and, where present, its config.json.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
}

impl ModelRef {
    /// Finds the model's files. A local reference may name a weights file or a directory
    /// holding `weights_file` (or its other names, see [`find_weights`]); a hub reference is
    /// looked up in the hub cache (`$HF_HOME/hub`) and, unless `HF_HUB_OFFLINE=1`,
    /// downloaded there when missing. [`Checkpoint`] reads whatever file it finds.
    pub fn resolve(&self, weights_file: &str) -> Result<ModelFiles, ModelError> {
        match self {
            ModelRef::Local(path) => resolve_local(path, weights_file),
            ModelRef::Hub { repo, revision } => resolve_hub(repo, revision, weights_file),
        }
    }
}

/// What a model is, for cache keys: the reference plus what pins its weights. A hub
/// snapshot is pinned by its commit (the directory name); a local model by a BLAKE3 hash
/// of its config, tokenizer and weight files, so retrained weights at the same path never
/// reuse stale cache entries.
pub fn fingerprint(reference: &ModelRef, files: &ModelFiles) -> Result<String, ModelError> {
    let dir = files.weights.parent().unwrap_or(Path::new("."));
    if let Some(commit) = dir.ancestors().find_map(|d| {
        let name = d.file_name()?.to_str()?;
        (is_commit_hash(name) && d.parent()?.file_name()? == "snapshots").then(|| name.to_string())
    }) {
        return Ok(format!("{reference}@{commit}"));
    }
    let mut paths = Vec::new();
    if matches!(reference, ModelRef::Local(p) if p.is_file()) {
        // A single weights file (or shard index, with its shards): its directory may hold
        // anything else. A file that is no checkpoint (a diffusers model_index.json) is
        // hashed as it is; loading it says what is wrong, not its identity.
        match Checkpoint::open(&files.weights) {
            Ok(checkpoint) => paths.extend(checkpoint.files()),
            Err(_) => paths.push(files.weights.clone()),
        }
        paths.extend(files.config.clone());
    } else {
        collect_model_files(dir, &mut paths)
            .map_err(|e| ModelError::Io { path: dir.to_path_buf(), source: e })?;
    }
    Ok(format!("{reference}#{}", hash_files(dir, &mut paths)?))
}

/// `blake3:<16 hex digits>` of files: each one's path relative to `dir` and its bytes,
/// in path order, so the same files hash the same wherever they are.
pub fn hash_files(dir: &Path, paths: &mut [PathBuf]) -> Result<String, ModelError> {
    paths.sort();
    let mut hasher = blake3::Hasher::new();
    for path in paths.iter() {
        let relative = path.strip_prefix(dir).unwrap_or(path);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let mut file = std::fs::File::open(path)
            .map_err(|e| ModelError::Io { path: path.clone(), source: e })?;
        hasher
            .update_reader(&mut file)
            .map_err(|e| ModelError::Io { path: path.clone(), source: e })?;
    }
    Ok(format!("blake3:{}", &hasher.finalize().to_hex()[..16]))
}

/// Files that define a model, recursively (diffusers keeps parts in subdirectories).
fn collect_model_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_model_files(&path, out)?;
        } else if [".json", ".txt", ".model"]
            .iter()
            .chain(&WEIGHTS_EXTENSIONS)
            .any(|ext| name.ends_with(ext))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// File names that hold weights, for the one-checkpoint-in-a-directory rule and messages.
const WEIGHTS_EXTENSIONS: [&str; 5] = [".safetensors", ".pth", ".pt", ".pth.tar", ".bin"];

/// The names the weights saved as `weights_file` also go by, in the order they are looked
/// for: the file, its shard index, then PyTorch's name for the same weights
/// (`pytorch_model.bin` for `model.safetensors`, `X.bin` for `X.safetensors`) and its index.
fn weights_names(weights_file: &str) -> Vec<String> {
    let Some(stem) = weights_file.strip_suffix(".safetensors") else {
        return vec![weights_file.into()];
    };
    let bin = if stem == "model" { "pytorch_model.bin".to_string() } else { format!("{stem}.bin") };
    vec![
        weights_file.into(),
        format!("{weights_file}.index.json"),
        format!("{bin}.index.json"),
        bin,
    ]
}

/// The checkpoint files directly in `dir`, sorted.
fn weights_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            p.is_file() && WEIGHTS_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
        })
        .collect();
    found.sort();
    found
}

/// The weights in a model directory saved as `weights_file` (e.g. `model.safetensors`):
/// that file, its shard index, PyTorch's `.bin` of the same weights, or else, when the
/// directory holds exactly one checkpoint file (`resnet18_places365.pth.tar`), that one.
pub fn find_weights(dir: &Path, weights_file: &str) -> Result<PathBuf, ModelError> {
    let names = weights_names(weights_file);
    if let Some(found) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        return Ok(found);
    }
    let present = weights_files_in(dir);
    if weights_file.ends_with(".safetensors") && present.len() == 1 {
        return Ok(present[0].clone());
    }
    let present = match present.len() {
        0 => "no checkpoint file".to_string(),
        _ => {
            let names: Vec<String> = present
                .iter()
                .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                .collect();
            format!("several checkpoint files ({})", names.join(", "))
        }
    };
    Err(ModelError::NotFound {
        what: format!("{} has no {} and {present}", dir.display(), names.join(" nor ")),
        help: format!(
            "pass the weights file itself (.safetensors, .pth, .pt, .pth.tar or .bin), or put it there as {weights_file}"
        ),
    })
}

fn resolve_local(path: &Path, weights_file: &str) -> Result<ModelFiles, ModelError> {
    if path.is_dir() {
        let weights = find_weights(path, weights_file)?;
        let config = Some(path.join("config.json")).filter(|c| c.is_file());
        return Ok(ModelFiles { weights, config });
    }
    if path.is_file() {
        let config = path.parent().map(|d| d.join("config.json")).filter(|c| c.is_file());
        return Ok(ModelFiles { weights: path.to_path_buf(), config });
    }
    Err(ModelError::NotFound {
        what: format!("no file or directory at {}", path.display()),
        help: "pass a directory holding model.safetensors (and optionally config.json), a weights file (.safetensors, .pth, .pt, .pth.tar, .bin, or a sharded checkpoint's .index.json), or hf:<org>/<name> for a Hugging Face model".into(),
    })
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

fn resolve_hub(repo: &str, revision: &str, weights_file: &str) -> Result<ModelFiles, ModelError> {
    let cache = hf_hub::Cache::from_env();
    let hub_repo = hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let cached = |file: &str| -> Option<PathBuf> {
        if is_commit_hash(revision) {
            // The cache's refs/ only names branches and tags; a commit is its own snapshot.
            let p = cache
                .path()
                .join(hub_repo.folder_name())
                .join("snapshots")
                .join(revision)
                .join(file);
            return p.is_file().then_some(p);
        }
        cache.repo(hub_repo.clone()).get(file)
    };
    let snapshot_dir = cache.path().join(hub_repo.folder_name());
    let names = weights_names(weights_file);
    if let Some(weights) = names.iter().find_map(|name| cached(name)) {
        return Ok(ModelFiles { weights, config: cached("config.json") });
    }
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let help = format!(
        "on a machine with network, run `huggingface-cli download {repo} --revision {revision}` (or `hf download`) with the same HF_HOME, copy {} here, or pass a local directory instead of hf:{repo}",
        snapshot_dir.display()
    );
    if offline {
        return Err(ModelError::NotFound {
            what: format!(
                "hf:{repo}@{revision} is not in the hub cache at {} and HF_HUB_OFFLINE is set",
                snapshot_dir.display()
            ),
            help,
        });
    }
    tracing::info!(repo, revision, "downloading {weights_file} from the Hugging Face hub");
    download(hub_repo, &names).map_err(|e| ModelError::NotFound {
        what: format!(
            "hf:{repo}@{revision} is not in the hub cache at {} and downloading it failed: {e}",
            snapshot_dir.display()
        ),
        help,
    })
}

/// Downloads the first of `names` the repository has (with its shards, for an index) and
/// its config.json; the error is the first name's.
fn download(hub_repo: hf_hub::Repo, names: &[String]) -> Result<ModelFiles, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let remote = api.repo(hub_repo);
    let mut first_error = None;
    for name in names {
        let weights = match remote.get(name) {
            Ok(weights) => weights,
            Err(e) => {
                first_error.get_or_insert(e.to_string());
                continue;
            }
        };
        if name.ends_with(".index.json") {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::HashMap<String, String>,
            }
            let text = std::fs::read_to_string(&weights).map_err(|e| e.to_string())?;
            let index: Index = crate::json::from_config_str(&text)
                .map_err(|e| format!("{name} is not a shard index: {e}"))?;
            let mut shards: Vec<&String> = index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                remote.get(shard).map_err(|e| format!("shard {shard}: {e}"))?;
            }
        }
        // config.json is optional for target models (the architecture can be read off the weights).
        let config = remote.get("config.json").ok();
        // So is a transformers image processor config: a ViT target's preprocessing.
        let _ = remote.get("preprocessor_config.json");
        return Ok(ModelFiles { weights, config });
    }
    Err(first_error.unwrap_or_else(|| "no file to download".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(
            "hf:timm/resnet50.tv_in1k".parse::<ModelRef>().unwrap(),
            ModelRef::Hub { repo: "timm/resnet50.tv_in1k".into(), revision: "main".into() }
        );
        assert_eq!(
            "hf:org/name@v1.0".parse::<ModelRef>().unwrap(),
            ModelRef::Hub { repo: "org/name".into(), revision: "v1.0".into() }
        );
        assert_eq!("models/r18".parse::<ModelRef>().unwrap(), ModelRef::Local("models/r18".into()));
        for bad in ["hf:", "hf:noslash", "hf:a/b/c", "hf:../x", "hf:a/b@", ""] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn missing_local_model_names_the_path_and_the_fix() {
        let err = "/nonexistent/dnd-model"
            .parse::<ModelRef>()
            .unwrap()
            .resolve("model.safetensors")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/dnd-model") && msg.contains("help:"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let msg = ModelRef::Local(dir.path().into())
            .resolve("model.safetensors")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("has no model.safetensors"), "{msg}");
    }

    #[test]
    fn a_directory_finds_its_weights_under_any_usual_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let touch = |name: &str| std::fs::write(d.join(name), b"x").unwrap();
        // The only checkpoint file of a directory is its weights, whatever its name.
        touch("resnet18_places365.pth.tar");
        assert!(
            find_weights(d, "model.safetensors").unwrap().ends_with("resnet18_places365.pth.tar")
        );
        // Several: the usual names decide; PyTorch's .bin is model.safetensors' other name.
        touch("pytorch_model.bin");
        assert!(find_weights(d, "model.safetensors").unwrap().ends_with("pytorch_model.bin"));
        touch("model.safetensors.index.json");
        assert!(
            find_weights(d, "model.safetensors").unwrap().ends_with("model.safetensors.index.json")
        );
        touch("model.safetensors");
        assert!(find_weights(d, "model.safetensors").unwrap().ends_with("model.safetensors"));
        touch("diffusion_pytorch_model.bin");
        let unet = find_weights(d, "diffusion_pytorch_model.safetensors").unwrap();
        assert!(unet.ends_with("diffusion_pytorch_model.bin"));
        // No usual name and several candidates: the message lists them.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("a.pth"), b"x").unwrap();
        std::fs::write(other.path().join("b.pt"), b"x").unwrap();
        let msg = find_weights(other.path(), "model.safetensors").unwrap_err().to_string();
        assert!(
            msg.contains("a.pth, b.pt") && msg.contains("pass the weights file itself"),
            "{msg}"
        );
    }

    #[test]
    fn hub_reference_resolves_from_the_cache_and_fails_offline_with_help() {
        let home = tempfile::tempdir().unwrap();
        let repo_dir = home.path().join("hub/models--org--tiny");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots/abc123")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo_dir.join("snapshots/abc123/model.safetensors"), b"x").unwrap();
        // SAFETY: this test is the only one in this crate that touches these variables.
        unsafe {
            std::env::set_var("HF_HOME", home.path());
            std::env::set_var("HF_HUB_OFFLINE", "1");
        }
        let files =
            "hf:org/tiny".parse::<ModelRef>().unwrap().resolve("model.safetensors").unwrap();
        assert!(files.weights.ends_with("snapshots/abc123/model.safetensors"));
        assert!(files.config.is_none());

        let msg = "hf:org/missing"
            .parse::<ModelRef>()
            .unwrap()
            .resolve("model.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("hf:org/missing@main")
                && msg.contains("HF_HUB_OFFLINE")
                && msg.contains("huggingface-cli download org/missing"),
            "{msg}"
        );
    }
}
