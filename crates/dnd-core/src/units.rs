//! Units: what dnd describes in a layer. A unit is a channel of the layer, a direction in
//! its channel space, or a latent of a sparse autoencoder (SAE) trained on it. Every kind
//! has a map: its value at every spatial position (or patch token) of the layer, computed
//! from the layer's channels at that position, so everything the method does with a
//! channel's map (pooling, top-K, attention crops, scoring) it does with any unit's.
//!
//! A direction and an SAE latent are both an [`Encoder`]: `f(W_enc^T (x - b_dec) + b_enc)`
//! at each position `x`, with `f` the identity for directions. [`Encoder::encode`] is the
//! reference computation, a plain loop; the pipeline runs the same arithmetic as one matrix
//! product per image batch on the model's device and is tested against this one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// What a unit is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    /// A channel of the layer (a neuron): its own map.
    #[default]
    Channel,
    /// A direction in the layer's channel space: the map of `x · d`.
    Direction,
    /// A latent of a sparse autoencoder: the map of its encoder's output.
    Sae,
}

impl UnitKind {
    pub const ALL: [UnitKind; 3] = [UnitKind::Channel, UnitKind::Direction, UnitKind::Sae];

    /// As job files and tables write it.
    pub const fn as_str(self) -> &'static str {
        match self {
            UnitKind::Channel => "channel",
            UnitKind::Direction => "direction",
            UnitKind::Sae => "sae",
        }
    }
}

impl fmt::Display for UnitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UnitKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UnitKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            CoreError::invalid(
                "units.kind",
                format!("`{s}` is not one of: channel, direction, sae"),
            )
        })
    }
}

/// The nonlinearity of an encoder, applied to each position's pre-activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "fn")]
pub enum Activation {
    /// None: a direction's projection, signed.
    Linear,
    /// `max(0, z)`.
    Relu,
    /// The `k` largest pre-activations of the position, each through ReLU; the rest 0
    /// (ties at the k-th value go to the lower unit index).
    TopK { k: usize },
    /// `z` where `z > threshold` of the unit (and `z > 0`), else 0.
    JumpRelu,
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Activation::Linear => f.write_str("linear"),
            Activation::Relu => f.write_str("relu"),
            Activation::TopK { k } => write!(f, "topk(k={k})"),
            Activation::JumpRelu => f.write_str("jumprelu"),
        }
    }
}

/// A dictionary of units over a layer's `d_in` channels, as an encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoder {
    pub d_in: usize,
    pub units: usize,
    /// `d_in x units`, row-major: SAELens' `W_enc` layout.
    pub w_enc: Vec<f32>,
    /// `units`.
    pub b_enc: Vec<f32>,
    /// `d_in`, subtracted from the input (zeros when the dictionary does not centre it).
    pub b_dec: Vec<f32>,
    /// `units` for [`Activation::JumpRelu`], empty otherwise.
    pub threshold: Vec<f32>,
    pub activation: Activation,
}

impl Encoder {
    /// An encoder, its parts' lengths checked against `d_in` and the unit count.
    pub fn new(
        d_in: usize,
        units: usize,
        (w_enc, b_enc, b_dec): (Vec<f32>, Vec<f32>, Vec<f32>),
        threshold: Vec<f32>,
        activation: Activation,
    ) -> Result<Self, CoreError> {
        let check = |name: &str, len: usize, want: usize, shape: &str| {
            if len == want {
                Ok(())
            } else {
                Err(CoreError::Shape(format!("{name} has {len} values, not {shape} = {want}")))
            }
        };
        if d_in == 0 || units == 0 {
            return Err(CoreError::Shape(format!(
                "a dictionary needs channels and units, not {d_in} x {units}"
            )));
        }
        check("W_enc", w_enc.len(), d_in * units, &format!("d_in x units ({d_in} x {units})"))?;
        check("b_enc", b_enc.len(), units, "units")?;
        check("b_dec", b_dec.len(), d_in, "d_in")?;
        match activation {
            Activation::JumpRelu => check("threshold", threshold.len(), units, "units")?,
            _ => check("threshold", threshold.len(), 0, "none without JumpReLU")?,
        }
        if let Activation::TopK { k } = activation
            && k == 0
        {
            return Err(CoreError::invalid("k", "a TopK dictionary keeps at least 1 latent"));
        }
        Ok(Self { d_in, units, w_enc, b_enc, b_dec, threshold, activation })
    }

    /// Directions as an encoder: `rows` is `units x d_in`, row-major (one direction a row);
    /// each unit's value is the position's dot product with its direction.
    pub fn directions(rows: &[f32], units: usize, d_in: usize) -> Result<Self, CoreError> {
        if rows.len() != units * d_in {
            return Err(CoreError::Shape(format!(
                "directions have {} values, not units x d_in = {units} x {d_in}",
                rows.len()
            )));
        }
        let mut w_enc = vec![0.0; rows.len()];
        for (u, row) in rows.chunks_exact(d_in.max(1)).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                w_enc[c * units + u] = v;
            }
        }
        Self::new(
            d_in,
            units,
            (w_enc, vec![0.0; units], vec![0.0; d_in]),
            Vec::new(),
            Activation::Linear,
        )
    }

    /// The units' values at `x.len() / d_in` positions (`positions x d_in`, row-major), as
    /// `positions x units`. The reference computation: a plain loop, exact f32 sums in
    /// channel order.
    pub fn encode(&self, x: &[f32]) -> Vec<f32> {
        assert!(x.len().is_multiple_of(self.d_in), "positions are not whole rows of d_in");
        let mut out = Vec::with_capacity(x.len() / self.d_in * self.units);
        for position in x.chunks_exact(self.d_in) {
            let mut pre = self.b_enc.clone();
            for (c, (&v, &b)) in position.iter().zip(&self.b_dec).enumerate() {
                let centred = v - b;
                let weights = &self.w_enc[c * self.units..(c + 1) * self.units];
                for (p, &w) in pre.iter_mut().zip(weights) {
                    *p += centred * w;
                }
            }
            self.activate(&mut pre);
            out.extend(pre);
        }
        out
    }

    /// Applies the nonlinearity in place to one position's pre-activations (`units` long).
    pub fn activate(&self, pre: &mut [f32]) {
        match self.activation {
            Activation::Linear => {}
            Activation::Relu => pre.iter_mut().for_each(|z| *z = z.max(0.0)),
            Activation::JumpRelu => {
                for (z, &t) in pre.iter_mut().zip(&self.threshold) {
                    if !(*z > t && *z > 0.0) {
                        *z = 0.0;
                    }
                }
            }
            Activation::TopK { k } => {
                if k >= pre.len() {
                    pre.iter_mut().for_each(|z| *z = z.max(0.0));
                    return;
                }
                let mut order: Vec<usize> = (0..pre.len()).collect();
                // Descending, NaN last, ties to the lower index: a total order.
                order.select_nth_unstable_by(k - 1, |&a, &b| {
                    pre[b].total_cmp(&pre[a]).then(a.cmp(&b))
                });
                let mut kept = vec![false; pre.len()];
                for &u in &order[..k] {
                    kept[u] = true;
                }
                for (z, keep) in pre.iter_mut().zip(kept) {
                    *z = if keep { z.max(0.0) } else { 0.0 };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 channels, 3 units: W_enc columns (1, 0), (0, 1), (1, 1); b_dec (1, 0).
    fn encoder(activation: Activation, b_enc: [f32; 3], threshold: Vec<f32>) -> Encoder {
        let w_enc = vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
        Encoder::new(2, 3, (w_enc, b_enc.to_vec(), vec![1.0, 0.0]), threshold, activation).unwrap()
    }

    #[test]
    fn relu_encoder_on_known_answers() {
        let e = encoder(Activation::Relu, [0.0, -1.0, 0.5], Vec::new());
        // x = (3, 2): centred (2, 2); pre = (2, 1, 4.5). x = (0, -1): centred (-1, -1);
        // pre = (-1, -2, -1.5) -> all 0.
        assert_eq!(e.encode(&[3.0, 2.0, 0.0, -1.0]), vec![2.0, 1.0, 4.5, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn topk_keeps_the_k_largest_then_relu() {
        let e = encoder(Activation::TopK { k: 2 }, [0.0, 0.0, 0.0], Vec::new());
        // pre = (2, 2, 4): ties at the 2nd value go to the lower index.
        assert_eq!(e.encode(&[3.0, 2.0]), vec![2.0, 0.0, 4.0]);
        // pre = (-1, 3, 2): the 2 largest are 3 and 2.
        assert_eq!(e.encode(&[0.0, 3.0]), vec![0.0, 3.0, 2.0]);
        // All negative: the top 2 go through ReLU to 0.
        assert_eq!(e.encode(&[-4.0, -5.0]), vec![0.0, 0.0, 0.0]);
        let all = encoder(Activation::TopK { k: 5 }, [0.0, 0.0, 0.0], Vec::new());
        assert_eq!(all.encode(&[0.0, 3.0]), vec![0.0, 3.0, 2.0]);
    }

    #[test]
    fn jumprelu_zeroes_what_is_not_above_its_threshold() {
        let e = encoder(Activation::JumpRelu, [0.0, 0.0, 0.0], vec![1.5, 2.0, 3.9]);
        // pre = (2, 2, 4): unit 1 equals its threshold, so it is off.
        assert_eq!(e.encode(&[3.0, 2.0]), vec![2.0, 0.0, 4.0]);
        // A negative threshold does not let a negative value through.
        let e = encoder(Activation::JumpRelu, [0.0, 0.0, 0.0], vec![-5.0, -5.0, -5.0]);
        assert_eq!(e.encode(&[0.0, -1.0]), vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn directions_are_signed_projections() {
        // Directions (1, 2) and (0, -1).
        let e = Encoder::directions(&[1.0, 2.0, 0.0, -1.0], 2, 2).unwrap();
        assert_eq!(e.activation, Activation::Linear);
        assert_eq!(e.encode(&[1.0, 1.0, -2.0, 0.5]), vec![3.0, -1.0, -1.0, -0.5]);
        assert!(Encoder::directions(&[1.0, 2.0, 3.0], 2, 2).is_err());
    }

    #[test]
    fn parts_of_the_wrong_size_are_named() {
        let err = Encoder::new(
            2,
            3,
            (vec![0.0; 5], vec![0.0; 3], vec![0.0; 2]),
            Vec::new(),
            Activation::Relu,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("W_enc") && err.contains("2 x 3"), "{err}");
        let err = Encoder::new(
            2,
            3,
            (vec![0.0; 6], vec![0.0; 3], vec![0.0; 2]),
            Vec::new(),
            Activation::JumpRelu,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("threshold"), "{err}");
        assert!(
            Encoder::new(
                2,
                3,
                (vec![0.0; 6], vec![0.0; 3], vec![0.0; 2]),
                Vec::new(),
                Activation::TopK { k: 0 }
            )
            .is_err()
        );
    }

    #[test]
    fn kinds_parse_and_print() {
        for kind in UnitKind::ALL {
            assert_eq!(kind.to_string().parse::<UnitKind>().unwrap(), kind);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
        }
        assert!("latent".parse::<UnitKind>().unwrap_err().to_string().contains("sae"));
    }
}
