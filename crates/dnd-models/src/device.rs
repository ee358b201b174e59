//! Choosing where tensors live.

use candle_core::Device;

use crate::error::ModelError;

/// `cpu`, `cuda` (the first GPU) or `cuda:N`. CUDA needs a build with the `cuda` feature.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let bad =
        |reason: &str| ModelError::BadReference { reference: spec.into(), reason: reason.into() };
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => {
                    n.parse().map_err(|_| bad("write the GPU as cuda:<number>, e.g. cuda:0"))?
                }
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(bad(
                    "this dnd was built without CUDA; rebuild with `--features cuda` or use --device cpu",
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => Err(bad("devices are `cpu`, `cuda` or `cuda:<n>`")),
    }
}
