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

use dnd_core::UnitKind;
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

/// What a stage reads at a layer: its channels, or a dictionary's units over them.
#[derive(Debug, Clone)]
pub struct Readout {
    pub tap: Tap,
    pub units: Option<Arc<LayerUnits>>,
}

impl PartialEq for Readout {
    fn eq(&self, other: &Self) -> bool {
        self.tap == other.tap && self.source() == other.source()
    }
}

impl Readout {
    pub fn channels(tap: Tap) -> Self {
        Self { tap, units: None }
    }

    /// `tap`'s readout in a job with the dictionaries `units`.
    pub fn of(tap: Tap, units: &UnitLayers) -> Self {
        Self { tap, units: units.get(&tap).cloned() }
    }

    pub fn kind(&self) -> UnitKind {
        self.units.as_ref().map_or(UnitKind::Channel, |u| u.info.kind)
    }

    /// The dictionary's identity (`None` for channels): the tables' `unit_source`.
    pub fn source(&self) -> Option<&str> {
        self.units.as_ref().map(|u| u.info.identity.as_str())
    }

    /// Units it reads: the dictionary's, or the tap's channels.
    pub fn width(&self, model: &TargetModel) -> usize {
        self.units.as_ref().map_or_else(|| model.tap_width(self.tap), |u| u.info.units)
    }

    /// The unit maps (or vectors) of the tap's output: the output itself for channels.
    pub fn apply(&self, output: Tensor) -> Result<Tensor, PipelineError> {
        match &self.units {
            None => Ok(output),
            Some(u) => Ok(u.encoder.maps(&output)?),
        }
    }

    /// What the vector cache calls `what` of this readout: `what/<tap>` for channels (as
    /// before units existed), `what/<tap>/<kind>-<identity>` for a dictionary's units.
    pub fn output(&self, what: &str) -> String {
        match &self.units {
            None => format!("{what}/{}", self.tap),
            Some(u) => format!("{what}/{}/{}-{}", self.tap, u.info.kind, u.info.identity),
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
