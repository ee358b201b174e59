//! A ViT's weights in one layout whatever the checkpoint's: the query, key and value
//! projections fused into one `(3C, C)` matrix, layer scales folded into the projections
//! they scale, missing biases as zeros. Generic over where a tensor lives: plain host
//! vectors for the CPU path, candle tensors on a device for the portable one.

use candle_core::{Device, Tensor};

use crate::error::ModelError;

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
