//! The engine's device backend driven by the CUDA decoder's CPU twins (`HostOps`): the whole
//! device serving path (block tables, slots, chunking, logits rows) runs without a GPU.

use coserve::backend::cuda::decoder::from_model::from_llama;
use coserve::backend::cuda::decoder::host::HostOps;
use coserve::backend::cuda::decoder::runner::{DeviceDecoder, DeviceModel};
use coserve::engine::Backend;

/// The name the twin backend reports as its device.
pub const TWIN_DEVICE: &str = "cuda twins (host)";

pub fn twin_backend() -> Backend {
    Backend::Device {
        name: TWIN_DEVICE.into(),
        kv_bytes_per_element: 2,
        build: Box::new(|model, cache| {
            let h = from_llama(&model, cache.block_size).map_err(|e| e.to_string())?;
            let (n, r) = (cache.num_blocks, cache.max_rows);
            let d = DeviceDecoder::new(HostOps, h.shape, h.weights, h.inv_freq, n, r)
                .map_err(|e| e.to_string())?;
            Ok(Box::new(d) as Box<dyn DeviceModel>)
        }),
    }
}
