//! Reading a checkpoint's tensors, whatever file they come in: safetensors (one file, or
//! shards listed by a `*.safetensors.index.json` / `pytorch_model.bin.index.json`) and
//! PyTorch pickles (`torch.save` zip files: `.pth`, `.pt`, `.pth.tar`, `.bin`).
//!
//! The format is read off the file's first bytes, not its name. Pickles hold the
//! `state_dict` at the top level or under a key (`state_dict`, `model`, ...), as training
//! scripts save them; names lose a prefix every tensor shares from wrappers
//! (`module.` from DataParallel/DistributedDataParallel, `_orig_mod.` from
//! `torch.compile`). [`Checkpoint::load`] upcasts float16/bfloat16 tensors to float32.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::ModelError;

/// Keys under which training scripts nest the `state_dict` in a pickle, in the order tried.
const STATE_DICT_KEYS: [&str; 5] = ["state_dict", "model", "model_state_dict", "net", "module"];

/// Prefixes that wrappers put on every name (and `load_state_dict` expects without).
const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

/// What a checkpoint file holds, for [`ModelError::BadCheckpoint`]'s "expected" line.
const EXPECTED_FORMATS: &str = "a safetensors file, a sharded checkpoint's *.index.json, or a PyTorch state_dict saved with torch.save (.pth, .pt, .pth.tar, .bin)";

/// A checkpoint file, opened: its format is known, its tensors are read on demand.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
}

#[derive(Debug, Clone)]
enum Format {
    Safetensors,
    /// A `torch.save` zip archive.
    Pickle,
    /// An index naming the shard file of every tensor; shards are checkpoints themselves.
    Sharded(Vec<Checkpoint>),
}

impl Checkpoint {
    /// Opens `path` and reads enough of it to know its format.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let mut head = [0u8; 32];
        let n = std::fs::File::open(path)
            .and_then(|mut f| read_up_to(&mut f, &mut head))
            .map_err(|source| ModelError::Io { path: path.into(), source })?;
        let head = &head[..n];
        let format = if head.starts_with(b"PK\x03\x04") {
            Format::Pickle
        } else if is_legacy_torch(head) {
            return Err(bad(
                path,
                "a PyTorch checkpoint in the legacy (before PyTorch 1.6) serialisation, which dnd cannot read",
                &resave_help(path),
            ));
        } else if path.to_string_lossy().ends_with(".index.json") {
            Format::Sharded(open_shards(path)?)
        } else if is_safetensors(head) {
            Format::Safetensors
        } else {
            let (found, help) = describe_unknown(head, path);
            return Err(bad(path, &found, &help));
        };
        Ok(Self { path: path.into(), format })
    }

    /// The file it was opened from (an index for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file that holds its tensors (the index and its shards for a sharded one).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        if let Format::Sharded(shards) = &self.format {
            files.extend(shards.iter().map(|s| s.path.clone()));
        }
        files
    }

    /// Tensor names (without wrapper prefixes) and shapes, without reading the weights.
    pub fn shapes(&self) -> Result<HashMap<String, Vec<usize>>, ModelError> {
        let shapes = match &self.format {
            Format::Safetensors => safetensors_shapes(&self.path).map_err(|e| {
                bad(&self.path, &format!("an unreadable safetensors file ({e})"), REDOWNLOAD)
            })?,
            Format::Pickle => {
                let (pth, _) = self.pickle()?;
                pth.tensor_infos()
                    .iter()
                    .map(|(name, info)| (name.clone(), info.layout.dims().to_vec()))
                    .collect()
            }
            Format::Sharded(shards) => {
                let mut all = HashMap::new();
                for shard in shards {
                    all.extend(shard.shapes()?);
                }
                return Ok(all);
            }
        };
        Ok(strip_wrapper_prefixes(shapes))
    }

    /// Every tensor, on `device`; float16/bfloat16 ones upcast to float32.
    pub fn load(&self, device: &Device) -> Result<HashMap<String, Tensor>, ModelError> {
        let tensors = match &self.format {
            Format::Safetensors => {
                candle_core::safetensors::load(&self.path, device).map_err(|e| {
                    bad(&self.path, &format!("an unreadable safetensors file ({e})"), REDOWNLOAD)
                })?
            }
            Format::Pickle => {
                let (pth, key) = self.pickle()?;
                let mut tensors = HashMap::with_capacity(pth.tensor_infos().len());
                for name in pth.tensor_infos().keys() {
                    let read = pth.get(name).map_err(|e| {
                        let at = key.map(|k| format!(" under `{k}`")).unwrap_or_default();
                        bad(
                            &self.path,
                            &format!("a PyTorch checkpoint whose tensor `{name}`{at} cannot be read ({e})"),
                            &resave_help(&self.path),
                        )
                    })?;
                    if let Some(t) = read {
                        tensors.insert(name.clone(), t.to_device(device)?);
                    }
                }
                tensors
            }
            Format::Sharded(shards) => {
                let mut all = HashMap::new();
                for shard in shards {
                    all.extend(shard.load(device)?);
                }
                return Ok(all);
            }
        };
        let mut tensors = strip_wrapper_prefixes(tensors);
        for t in tensors.values_mut() {
            if matches!(t.dtype(), DType::F16 | DType::BF16) {
                *t = t.to_dtype(DType::F32)?;
            }
        }
        Ok(tensors)
    }

    /// A `VarBuilder` over the tensors, converted to `dtype` on `device` as they are taken.
    /// Safetensors without wrapper prefixes are memory-mapped; anything else is read whole.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, ModelError> {
        let files: Option<Vec<PathBuf>> = match &self.format {
            Format::Safetensors => Some(vec![self.path.clone()]),
            Format::Sharded(shards) => shards
                .iter()
                .map(|s| matches!(s.format, Format::Safetensors).then(|| s.path.clone()))
                .collect(),
            Format::Pickle => None,
        };
        match files {
            Some(files) if !self.raw_names_have_wrapper()? => {
                // SAFETY: the files are memory-mapped read-only; dnd never writes model files.
                unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
                    bad(&self.path, &format!("an unreadable safetensors file ({e})"), REDOWNLOAD)
                })
            }
            _ => Ok(VarBuilder::from_tensors(self.load(device)?, dtype, device)),
        }
    }

    /// Whether the names as stored carry a wrapper prefix (so mmap would not find them).
    fn raw_names_have_wrapper(&self) -> Result<bool, ModelError> {
        let raw = match &self.format {
            Format::Safetensors => safetensors_shapes(&self.path).map_err(|e| {
                bad(&self.path, &format!("an unreadable safetensors file ({e})"), REDOWNLOAD)
            })?,
            Format::Sharded(shards) => {
                for shard in shards {
                    if shard.raw_names_have_wrapper()? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
            Format::Pickle => return Ok(true),
        };
        Ok(common_wrapper_prefix(raw.keys()).is_some())
    }

    /// The pickle's tensors, from the top level or the first key that holds a state_dict.
    fn pickle(&self) -> Result<(PthTensors, Option<&'static str>), ModelError> {
        let unreadable = |e: candle_core::Error| {
            bad(
                &self.path,
                &format!("a zip archive that is not a readable torch.save checkpoint ({e})"),
                &resave_help(&self.path),
            )
        };
        let top = PthTensors::new(&self.path, None).map_err(unreadable)?;
        if !top.tensor_infos().is_empty() {
            return Ok((top, None));
        }
        for key in STATE_DICT_KEYS {
            // A missing key is an error here; the next key is tried.
            if let Ok(nested) = PthTensors::new(&self.path, Some(key))
                && !nested.tensor_infos().is_empty()
            {
                return Ok((nested, Some(key)));
            }
        }
        Err(bad(
            &self.path,
            &format!(
                "a PyTorch checkpoint with no tensors at its top level nor under {}",
                STATE_DICT_KEYS.map(|k| format!("`{k}`")).join(", ")
            ),
            &resave_help(&self.path),
        ))
    }
}

const REDOWNLOAD: &str =
    "the file may be truncated or still an LFS pointer: download it again and check its size";

fn bad(path: &Path, found: &str, help: &str) -> ModelError {
    ModelError::BadCheckpoint {
        path: path.into(),
        found: found.into(),
        expected: EXPECTED_FORMATS.into(),
        help: help.into(),
    }
}

/// How to turn any checkpoint PyTorch can load into one dnd reads.
fn resave_help(path: &Path) -> String {
    let p = path.display();
    format!(
        "re-save its state_dict with a current PyTorch: python -c \"import torch; c = torch.load('{p}', map_location='cpu', weights_only=False); c = c.get('state_dict', c) if isinstance(c, dict) else c.state_dict(); torch.save(c, 'model.pth')\" (add encoding='latin1' for Python 2 files)"
    )
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `torch.save(..., _use_new_zipfile_serialization=False)`: a pickle (protocol 2+) of
/// PyTorch's magic number 0x1950a86a20f9469cfc6c, written as a 10-byte LONG1.
fn is_legacy_torch(head: &[u8]) -> bool {
    head.len() >= 14
        && head[0] == 0x80
        && head[2] == 0x8a
        && head[3] == 10
        && head[4..14] == [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]
}

/// An 8-byte little-endian header length, then the JSON header.
fn is_safetensors(head: &[u8]) -> bool {
    head.len() >= 9 && {
        let len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        (2..=MAX_HEADER).contains(&len) && head[8] == b'{'
    }
}

/// Larger headers are not safetensors files (the format caps them at 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// What a file of neither format is, and what to do about it.
fn describe_unknown(head: &[u8], path: &Path) -> (String, String) {
    if head.starts_with(b"version https://git-lfs") {
        let help = "fetch the weights: run `git lfs pull` where the model was cloned";
        return ("a Git LFS pointer, not the weights".into(), help.into());
    }
    if head.first() == Some(&0x80) {
        return ("a bare Python pickle, not a torch.save zip archive".into(), resave_help(path));
    }
    let text: String = head
        .iter()
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
        .collect();
    let found = match head.len() {
        0 => "an empty file".to_string(),
        _ => format!("a file in neither format (it starts `{text}`)"),
    };
    (found, format!("{REDOWNLOAD}, or {}", resave_help(path)))
}

/// Keeps the names of a shard index's `weight_map` and opens each shard it names once.
fn open_shards(index: &Path) -> Result<Vec<Checkpoint>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .map_err(|source| ModelError::Io { path: index.into(), source })?;
    let parsed: Index = crate::json::from_config_str(&text).map_err(|e| {
        bad(
            index,
            &format!("a shard index without a readable `weight_map` ({e})"),
            "a sharded checkpoint's index is the model.safetensors.index.json saved beside its shards; download it again",
        )
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(bad(index, "a shard index that lists no tensors", REDOWNLOAD));
    }
    names
        .into_iter()
        .map(|name| {
            let shard = dir.join(name);
            if !shard.is_file() || name.contains("..") {
                return Err(ModelError::NotFound {
                    what: format!(
                        "{} lists shard {name}, which is not in {}",
                        index.display(),
                        dir.display()
                    ),
                    help: "download every shard the index lists into the same directory".into(),
                });
            }
            let opened = Checkpoint::open(&shard)?;
            if matches!(opened.format, Format::Sharded(_)) {
                return Err(bad(
                    index,
                    &format!("a shard index whose shard {name} is an index"),
                    REDOWNLOAD,
                ));
            }
            Ok(opened)
        })
        .collect()
}

/// The wrapper prefix every name shares, if any.
fn common_wrapper_prefix<'a>(
    mut names: impl Iterator<Item = &'a String> + Clone,
) -> Option<&'static str> {
    let first = names.clone().next()?;
    let prefix = WRAPPER_PREFIXES.into_iter().find(|p| first.starts_with(p))?;
    names.all(|n| n.starts_with(prefix)).then_some(prefix)
}

/// Drops wrapper prefixes that every name shares (repeatedly: `module._orig_mod.`).
fn strip_wrapper_prefixes<T>(mut map: HashMap<String, T>) -> HashMap<String, T> {
    while let Some(prefix) = common_wrapper_prefix(map.keys()) {
        map = map.into_iter().map(|(name, v)| (name[prefix.len()..].to_string(), v)).collect();
    }
    map
}

/// Tensor names and shapes from a safetensors header: an 8-byte little-endian length,
/// then that many bytes of JSON (`{"name": {"dtype", "shape", "data_offsets"}, ...}`).
pub fn safetensors_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<usize>,
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(format!("a header of {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    raw.into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| {
            let entry: Entry = serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))?;
            Ok((name, entry.shape))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pth_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny_resnet_pth")
            .join(name)
    }

    fn tensor(values: &[f32], dtype: DType) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn sharded_safetensors_load_as_one_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let a = HashMap::from([("a.weight".to_string(), tensor(&[1.0, 2.0], DType::F16))]);
        let b = HashMap::from([("b.weight".to_string(), tensor(&[3.0], DType::BF16))]);
        candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
            .unwrap();
        candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
            .unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata": {"total_size": 6}, "weight_map": {
                "a.weight": "model-00001-of-00002.safetensors",
                "b.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let checkpoint = Checkpoint::open(&index).unwrap();
        assert_eq!(checkpoint.files().len(), 3);
        let shapes = checkpoint.shapes().unwrap();
        assert_eq!(shapes["a.weight"], vec![2]);
        assert_eq!(shapes["b.weight"], vec![1]);
        let tensors = checkpoint.load(&Device::Cpu).unwrap();
        // Half-precision tensors come out as f32.
        assert_eq!(tensors["a.weight"].dtype(), DType::F32);
        assert_eq!(values(&tensors["b.weight"]), vec![3.0]);
        let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(values(&vb.get(2, "a.weight").unwrap()), vec![1.0, 2.0]);
        assert_eq!(values(&vb.get(1, "b.weight").unwrap()), vec![3.0]);

        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let msg = Checkpoint::open(&index).unwrap_err().to_string();
        assert!(msg.contains("model-00002-of-00002.safetensors") && msg.contains("help:"), "{msg}");
    }

    #[test]
    fn wrapper_prefixes_are_dropped_from_safetensors_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let t = HashMap::from([
            ("module._orig_mod.fc.weight".to_string(), tensor(&[1.0], DType::F32)),
            ("module._orig_mod.fc.bias".to_string(), tensor(&[2.0], DType::F32)),
        ]);
        candle_core::safetensors::save(&t, &path).unwrap();
        let checkpoint = Checkpoint::open(&path).unwrap();
        let mut names: Vec<String> = checkpoint.shapes().unwrap().into_keys().collect();
        names.sort();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(values(&vb.get(1, "fc.bias").unwrap()), vec![2.0]);
    }

    #[test]
    fn pytorch_pickles_in_the_usual_layouts_read_the_same_tensors() {
        let plain =
            Checkpoint::open(&pth_fixture("plain.pth")).unwrap().load(&Device::Cpu).unwrap();
        assert!(plain.contains_key("conv1.weight") && plain.contains_key("fc.bias"));
        // torch.save(model.state_dict()) keeps BatchNorm's int64 counters.
        assert_eq!(plain["bn1.num_batches_tracked"].dtype(), DType::I64);
        let places = Checkpoint::open(&pth_fixture("places365_layout.pth.tar"))
            .unwrap()
            .load(&Device::Cpu)
            .unwrap();
        let half = Checkpoint::open(&pth_fixture("half_model.pt")).unwrap();
        assert_eq!(half.shapes().unwrap()["fc.weight"], plain["fc.weight"].dims());
        let half = half.load(&Device::Cpu).unwrap();
        let mut names: Vec<&String> = plain.keys().collect();
        names.sort();
        assert_eq!(names, {
            let mut n: Vec<&String> = places.keys().collect();
            n.sort();
            n
        });
        for (name, t) in &plain {
            if t.dtype() != DType::F32 {
                continue;
            }
            assert_eq!(values(t), values(&places[name]), "{name}");
            assert_eq!(half[name].dtype(), DType::F32, "{name}");
            let rounded = t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(values(&rounded), values(&half[name]), "{name}");
        }
    }

    #[test]
    fn unreadable_files_say_what_they_are_and_what_to_do() {
        let legacy = pth_fixture("legacy.pth");
        let msg = Checkpoint::open(&legacy).unwrap_err().to_string();
        assert!(
            msg.contains(&legacy.display().to_string())
                && msg.contains("legacy")
                && msg.contains("expected: a safetensors file")
                && msg.contains("torch.save(c, 'model.pth')"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes, needle) in [
            (
                "lfs.safetensors",
                &b"version https://git-lfs.github.com/spec/v1\n"[..],
                "git lfs pull",
            ),
            ("notes.pth", b"hello, world", "starts `hello, world`"),
            ("empty.bin", b"", "an empty file"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = Checkpoint::open(&path).unwrap_err();
            let msg = err.to_string();
            assert!(err.is_user_error(), "{msg}");
            assert!(msg.contains(name) && msg.contains(needle) && msg.contains("help:"), "{msg}");
        }
        // A zip that is no torch checkpoint fails when read, still naming the file.
        let zip = dir.path().join("x.pth");
        std::fs::write(&zip, b"PK\x03\x04garbage").unwrap();
        let msg = Checkpoint::open(&zip).unwrap().shapes().unwrap_err().to_string();
        assert!(msg.contains("x.pth") && msg.contains("torch.save"), "{msg}");
    }
}
