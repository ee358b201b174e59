//! GPU memory for the worker's metrics, read from NVIDIA's management library (NVML).
//! The library is loaded at run time, so CPU builds and CPU nodes work unchanged and
//! simply export no GPU metrics.

use nvml_wrapper::Nvml;

/// One GPU's memory, as the driver counts it (every process on the device).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

/// The GPUs visible to this process (in a pod: those the device plugin gave it).
pub struct GpuMemory {
    nvml: Nvml,
}

impl GpuMemory {
    /// None where there is no NVIDIA driver.
    pub fn open() -> Option<Self> {
        // Containers get the versioned library from the NVIDIA runtime, hosts usually both.
        let nvml =
            Nvml::builder().lib_path("libnvidia-ml.so.1".as_ref()).init().or_else(|_| Nvml::init());
        match nvml {
            Ok(nvml) => Some(Self { nvml }),
            Err(e) => {
                tracing::debug!("no GPU memory metrics: NVML is not available ({e})");
                None
            }
        }
    }

    /// Every visible GPU's memory now; a GPU that fails to answer is left out.
    pub fn read(&self) -> Vec<GpuReading> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok()?;
                let name = device.name().unwrap_or_default();
                Some(GpuReading { index, name, used_bytes: memory.used, total_bytes: memory.total })
            })
            .collect()
    }
}

/// Sets the GPU memory gauges from `readings`.
pub fn record(metrics: &dnd_metrics::Metrics, readings: &[GpuReading]) {
    for r in readings {
        let index = r.index.to_string();
        let labels = [("gpu", index.as_str()), ("name", r.name.as_str())];
        metrics.set("dnd_gpu_memory_used_bytes", &labels, r.used_bytes as f64);
        metrics.set("dnd_gpu_memory_total_bytes", &labels, r.total_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_gauges_per_gpu() {
        let metrics = dnd_metrics::Metrics::new();
        metrics.describe("dnd_gpu_memory_used_bytes", dnd_metrics::Kind::Gauge, "used");
        metrics.describe("dnd_gpu_memory_total_bytes", dnd_metrics::Kind::Gauge, "total");
        let h100 = |index, used| GpuReading {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            used_bytes: used,
            total_bytes: 85_520_809_984,
        };
        record(&metrics, &[h100(0, 1_000_000), h100(1, 2_000_000)]);
        record(&metrics, &[h100(0, 3_000_000)]);
        let text = metrics.render();
        assert!(
            text.contains(
                "dnd_gpu_memory_used_bytes{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 3000000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "dnd_gpu_memory_used_bytes{gpu=\"1\",name=\"NVIDIA H100 80GB HBM3\"} 2000000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "dnd_gpu_memory_total_bytes{gpu=\"1\",name=\"NVIDIA H100 80GB HBM3\"} 85520809984\n"
            ),
            "{text}"
        );
    }

    /// Opening never fails a worker: on a machine without the driver it is None, with
    /// it every GPU answers with a plausible reading.
    #[test]
    fn opening_works_with_and_without_a_driver() {
        if let Some(gpus) = GpuMemory::open() {
            for r in gpus.read() {
                assert!(r.total_bytes > 0 && r.used_bytes <= r.total_bytes, "{r:?}");
            }
        }
    }
}
