//! A ViT's weights in one layout whatever the checkpoint's: the query, key and value
//! projections fused into one `(3C, C)` matrix, layer scales folded into the projections
//! they scale, missing biases as zeros. Generic over where a tensor lives: plain host
//! vectors for the CPU path, candle tensors on a device for the portable one.

use candle_core::{Device, Tensor};

use crate::error::ModelError;
use crate::linear::PackedLinear;

/// A row-major f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

impl HostTensor {
    pub fn new(data: Vec<f32>, shape: &[usize]) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { data, shape: shape.to_vec() }
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self::new(vec![0.0; shape.iter().product()], shape)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Norm<T> {
    pub weight: T,
    pub bias: T,
}

#[derive(Debug, Clone)]
pub(crate) struct BlockParams<T> {
    pub ln1: Norm<T>,
    /// `(3C, C)`: query, key, value rows in that order.
    pub qkv_weight: T,
    pub qkv_bias: T,
    /// `(C, C)`, the first layer scale folded in.
    pub proj_weight: T,
    pub proj_bias: T,
    pub ln2: Norm<T>,
    /// `(M, C)`.
    pub fc1_weight: T,
    pub fc1_bias: T,
    /// `(C, M)`, the second layer scale folded in.
    pub fc2_weight: T,
    pub fc2_bias: T,
}

#[derive(Debug, Clone)]
pub(crate) struct HeadParams<T> {
    pub norm: Option<Norm<T>>,
    /// `(K, in)`.
    pub weight: T,
    pub bias: T,
}

#[derive(Debug, Clone)]
pub(crate) struct Params<T> {
    /// `(C, 3, p, p)`.
    pub patch_weight: T,
    pub patch_bias: T,
    /// `(C)`.
    pub class_token: Option<T>,
    /// `(R, C)`.
    pub registers: Option<T>,
    /// Position rows of the leading prefix tokens that have one, `(n, C)`.
    pub pos_prefix: Option<T>,
    /// Position rows of the patch grid, `(rows*cols, C)`.
    pub pos_grid: T,
    pub pre_norm: Option<Norm<T>>,
    pub blocks: Vec<BlockParams<T>>,
    pub norm: Option<Norm<T>>,
    pub head: Option<HeadParams<T>>,
}

impl<T> Norm<T> {
    fn map<U>(
        &self,
        f: &mut impl FnMut(&T) -> Result<U, ModelError>,
    ) -> Result<Norm<U>, ModelError> {
        Ok(Norm { weight: f(&self.weight)?, bias: f(&self.bias)? })
    }
}

impl<T> Params<T> {
    /// The same weights, each converted by `f`.
    pub fn map<U>(
        &self,
        f: &mut impl FnMut(&T) -> Result<U, ModelError>,
    ) -> Result<Params<U>, ModelError> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(BlockParams {
                    ln1: b.ln1.map(f)?,
                    qkv_weight: f(&b.qkv_weight)?,
                    qkv_bias: f(&b.qkv_bias)?,
                    proj_weight: f(&b.proj_weight)?,
                    proj_bias: f(&b.proj_bias)?,
                    ln2: b.ln2.map(f)?,
                    fc1_weight: f(&b.fc1_weight)?,
                    fc1_bias: f(&b.fc1_bias)?,
                    fc2_weight: f(&b.fc2_weight)?,
                    fc2_bias: f(&b.fc2_bias)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let head = match &self.head {
            Some(h) => Some(HeadParams {
                norm: h.norm.as_ref().map(|n| n.map(f)).transpose()?,
                weight: f(&h.weight)?,
                bias: f(&h.bias)?,
            }),
            None => None,
        };
        Ok(Params {
            patch_weight: f(&self.patch_weight)?,
            patch_bias: f(&self.patch_bias)?,
            class_token: self.class_token.as_ref().map(&mut *f).transpose()?,
            registers: self.registers.as_ref().map(&mut *f).transpose()?,
            pos_prefix: self.pos_prefix.as_ref().map(&mut *f).transpose()?,
            pos_grid: f(&self.pos_grid)?,
            pre_norm: self.pre_norm.as_ref().map(|n| n.map(f)).transpose()?,
            blocks,
            norm: self.norm.as_ref().map(|n| n.map(f)).transpose()?,
            head,
        })
    }
}

impl Params<HostTensor> {
    /// The weights as tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<Params<Tensor>, ModelError> {
        self.map(&mut |t: &HostTensor| Ok(Tensor::from_slice(&t.data, t.shape.as_slice(), device)?))
    }
}

/// The CPU path's weights: the five kinds of matrices (patch projection; per block the
/// fused q/k/v, the attention output, the MLP's two layers) packed for
/// [`PackedLinear::apply`] (their row-major copies dropped, so the weights are held
/// once), everything else as it is.
pub(crate) struct CpuParams {
    /// The weights; the packed matrices' `data` are empty (their shapes kept).
    pub params: Params<HostTensor>,
    pub patch: PackedLinear,
    /// Per block: qkv, proj, fc1, fc2.
    pub blocks: Vec<[PackedLinear; 4]>,
}

impl CpuParams {
    pub fn new(mut params: Params<HostTensor>) -> Self {
        let pack = |t: &mut HostTensor| {
            let (n, k) = (t.shape[0], t.shape[1..].iter().product());
            PackedLinear::new(&std::mem::take(&mut t.data), n, k)
        };
        let patch = pack(&mut params.patch_weight);
        let blocks = params
            .blocks
            .iter_mut()
            .map(|b| {
                [
                    pack(&mut b.qkv_weight),
                    pack(&mut b.proj_weight),
                    pack(&mut b.fc1_weight),
                    pack(&mut b.fc2_weight),
                ]
            })
            .collect();
        Self { params, patch, blocks }
    }

    /// All the weights, row-major, as tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<Params<Tensor>, ModelError> {
        let mut full = self.params.clone();
        full.patch_weight.data = self.patch.to_row_major();
        for (b, packed) in full.blocks.iter_mut().zip(&self.blocks) {
            b.qkv_weight.data = packed[0].to_row_major();
            b.proj_weight.data = packed[1].to_row_major();
            b.fc1_weight.data = packed[2].to_row_major();
            b.fc2_weight.data = packed[3].to_row_major();
        }
        full.to_tensors(device)
    }
}
