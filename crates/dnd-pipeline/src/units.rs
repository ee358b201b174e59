//! Units as the stages see them: what a stage reads at a layer ([`Readout`]) is the tap's
//! channels, or the units of a dictionary over them (`[target.units.<layer>]`). The
//! dictionaries are checked against the target before any work ([`inspect_units`]: header
//! reads only, what planning needs) and loaded onto the target's device with the other
//! models ([`load_units`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use dnd_core::{NeuronId, UnitKind};
use dnd_models::dictionary::{self, DeviceEncoder, DictionaryInfo};
use dnd_models::target::TargetShape;
use dnd_models::{Tap, TargetModel};

use crate::error::PipelineError;
use crate::job::JobSpec;

/// A dictionary loaded on the target's device.
#[derive(Debug)]
pub struct LayerUnits {
    pub info: DictionaryInfo,
    pub encoder: DeviceEncoder,
}

/// The dictionaries of a job, by the tap they read.
pub type UnitLayers = BTreeMap<Tap, Arc<LayerUnits>>;

/// What a stage reads at a layer: its channels, or a dictionary's units over them (all
/// of them, or a neuron task's: see [`Readout::select`]).
#[derive(Debug, Clone)]
pub struct Readout {
    pub tap: Tap,
    pub units: Option<Arc<LayerUnits>>,
    /// The dictionary units read, in this order; all when `None`.
    selected: Option<Arc<[NeuronId]>>,
}

impl PartialEq for Readout {
    fn eq(&self, other: &Self) -> bool {
        self.tap == other.tap && self.source() == other.source() && self.selected == other.selected
    }
}

impl Readout {
    pub fn channels(tap: Tap) -> Self {
        Self { tap, units: None, selected: None }
    }

    /// `tap`'s readout in a job with the dictionaries `units`.
    pub fn of(tap: Tap, units: &UnitLayers) -> Self {
        Self { tap, units: units.get(&tap).cloned(), selected: None }
    }

    /// Only `neurons` of a dictionary, in this order: what a neuron task's stages read, so
    /// that a crop's maps and a generated image's cached activations hold a task's few
    /// units, not the whole dictionary's thousands. (The encoder still runs whole: TopK
    /// needs every latent to pick its k.) Channels are read whole, as ever: there are few.
    pub fn select(&self, neurons: &[NeuronId]) -> Self {
        let selected = self.units.as_ref().map(|_| Arc::from(neurons));
        Self { selected, ..self.clone() }
    }

    /// Where `neuron`'s values are in what this readout gives: its index, or its place
    /// among the selected units.
    pub fn column(&self, neuron: NeuronId) -> usize {
        match &self.selected {
            None => neuron.index(),
            Some(s) => s.iter().position(|&n| n == neuron).unwrap_or_else(|| {
                panic!("unit {neuron} is not among the units this readout reads")
            }),
        }
    }

    pub fn kind(&self) -> UnitKind {
        self.units.as_ref().map_or(UnitKind::Channel, |u| u.info.kind)
    }

    /// The dictionary's identity (`None` for channels): the tables' `unit_source`.
    pub fn source(&self) -> Option<&str> {
        self.units.as_ref().map(|u| u.info.identity.as_str())
    }

    /// Units it reads: the selected ones, the dictionary's, or the tap's channels.
    pub fn width(&self, model: &TargetModel) -> usize {
        match (&self.selected, &self.units) {
            (Some(s), _) => s.len(),
            (None, Some(u)) => u.info.units,
            (None, None) => model.tap_width(self.tap),
        }
    }

    /// The unit maps (or vectors) of the tap's output: the output itself for channels.
    pub fn apply(&self, output: Tensor) -> Result<Tensor, PipelineError> {
        let Some(u) = &self.units else { return Ok(output) };
        let maps = u.encoder.maps(&output)?;
        match &self.selected {
            None => Ok(maps),
            Some(s) => {
                let ids: Vec<u32> = s.iter().map(|n| n.to_u32()).collect();
                let ids = Tensor::from_vec(ids, s.len(), maps.device())?;
                Ok(maps.index_select(&ids, 1)?.contiguous()?)
            }
        }
    }

    /// What the vector cache calls `what` of this readout: `what/<tap>` for channels (as
    /// before units existed), `what/<tap>/<kind>-<identity>` for a dictionary's units.
    pub fn output(&self, what: &str) -> String {
        let Some(u) = &self.units else { return format!("{what}/{}", self.tap) };
        let all = format!("{what}/{}/{}-{}", self.tap, u.info.kind, u.info.identity);
        match &self.selected {
            None => all,
            Some(s) => {
                let ids: Vec<String> = s.iter().map(NeuronId::to_string).collect();
                let hash = blake3::hash(ids.join(",").as_bytes()).to_hex();
                format!("{all}/units-{}", &hash[..16])
            }
        }
    }
}

impl fmt::Display for Readout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.units {
            None => write!(f, "{}", self.tap),
            Some(u) => write!(f, "{} ({} {})", self.tap, u.info.kind, u.info.identity),
        }
    }
}

/// Per image of a batch of unit maps `(B, U, h, w)` (or unit vectors `(B, U)`): the share
/// of positions where each unit is above 0, `(B, U)`. What [`dnd_core::Firing`] counts.
pub fn firing_shares(maps: &Tensor) -> Result<Tensor, PipelineError> {
    let on = maps.gt(0.0)?.to_dtype(DType::F32)?;
    Ok(if on.rank() == 4 { on.flatten_from(2)?.mean(D::Minus1)? } else { on })
}

/// Reads and checks every dictionary of the job against the target (headers and configs
/// only): the width each reads against its layer's. Run before any work; errors name the
/// file and the mismatch.
pub fn inspect_units(
    spec: &JobSpec,
    shape: &TargetShape,
) -> Result<BTreeMap<Tap, DictionaryInfo>, PipelineError> {
    let mut out = BTreeMap::new();
    for (layer, entry) in &spec.target.units {
        if entry.kind == UnitKind::Channel {
            continue;
        }
        let tap = shape.tap(layer)?;
        let info = dictionary::inspect(entry.kind, Path::new(&entry.source))?;
        dictionary::check_width(&info, layer, shape.tap_width(tap))?;
        if out.contains_key(&tap) {
            return Err(dnd_core::CoreError::invalid(
                "target.units",
                format!("`{layer}` is a layer (`{tap}`) that another entry names too"),
            )
            .into());
        }
        out.insert(tap, info);
    }
    Ok(out)
}

/// Loads every dictionary of the job onto the target's device.
pub fn load_units(spec: &JobSpec, target: &TargetModel) -> Result<UnitLayers, PipelineError> {
    let mut out = UnitLayers::new();
    for (tap, info) in inspect_units(spec, &target.shape())? {
        let encoder = DeviceEncoder::new(&dictionary::load(&info)?, &target.device)?;
        tracing::info!(layer = %tap, kind = %info.kind, units = info.units, activation = %info.activation, identity = info.identity, "loaded dictionary");
        out.insert(tap, Arc::new(LayerUnits { info, encoder }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use dnd_core::{Activation, Encoder};
    use std::path::PathBuf;

    /// A TopK(1) SAE of 3 units over 2 channels: unit u reads channel u % 2, scaled by u + 1.
    fn readout() -> Readout {
        let w = vec![1.0, 0.0, 3.0, 0.0, 2.0, 0.0];
        let encoder = Encoder::new(
            2,
            3,
            (w, vec![0.0; 3], vec![0.0; 2]),
            Vec::new(),
            Activation::TopK { k: 1 },
        )
        .unwrap();
        let info = DictionaryInfo {
            kind: UnitKind::Sae,
            weights: PathBuf::from("sae_weights.safetensors"),
            config: None,
            d_in: 2,
            units: 3,
            activation: encoder.activation,
            centre: false,
            identity: "blake3:0000000000000000".into(),
            names: Vec::new(),
        };
        let encoder = DeviceEncoder::new(&encoder, &Device::Cpu).unwrap();
        Readout {
            tap: Tap::Layer(4),
            units: Some(Arc::new(LayerUnits { info, encoder })),
            selected: None,
        }
    }

    #[test]
    fn a_selection_reads_its_units_of_the_whole_encoder() {
        let all = readout();
        // One image, 2 channels at 2 positions: (1, 1) and (2, 0).
        let x = Tensor::from_vec(vec![1.0f32, 2.0, 1.0, 0.0], (1, 2, 1, 2), &Device::Cpu).unwrap();
        let whole = all.apply(x.clone()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Pre-activations (1, 2, 3) and (2, 0, 6): TopK(1) keeps unit 2 at both.
        assert_eq!(whole, [0.0, 0.0, 0.0, 0.0, 3.0, 6.0]);
        let picked = all.select(&[NeuronId::new(2), NeuronId::new(0)]);
        let part = picked.apply(x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(part, [3.0, 6.0, 0.0, 0.0], "unit 2 then unit 0");
        assert_eq!((picked.column(NeuronId::new(0)), all.column(NeuronId::new(0))), (1, 0));
        assert_ne!(picked.output("pooled"), all.output("pooled"));
        assert!(all.output("pooled").starts_with("pooled/layer4/sae-blake3:"));
        assert_eq!(Readout::channels(Tap::Layer(4)).output("pooled"), "pooled/layer4");
        let channels = Readout::channels(Tap::Fc);
        assert_eq!(channels.select(&[NeuronId::new(3)]), channels, "channels are read whole");
    }
}
