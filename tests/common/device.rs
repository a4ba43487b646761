//! The engine's device backend driven by the CUDA decoder's CPU twins (`HostOps`): the whole
//! device serving path (block tables, slots, chunking, logits rows) runs without a GPU.

use coserve::backend::cuda::decoder::from_model::from_llama;
use coserve::backend::cuda::decoder::host::HostOps;
use coserve::backend::cuda::decoder::runner::{DeviceDecoder, DeviceModel};
use coserve::engine::Backend;

/// A device `backend` whose model is wrapped by `wrap` once built (to count or fault calls).
pub fn wrap_device(
    backend: Backend,
    wrap: impl Fn(Box<dyn DeviceModel>) -> Box<dyn DeviceModel> + Send + 'static,
) -> Backend {
    let Backend::Device { name, kv_bytes_per_element, build } = backend else {
        unreachable!("a device backend")
    };
    let build: coserve::engine::DeviceBuilder =
        Box::new(move |model, cache| Ok(wrap(build(model, cache)?)));
    Backend::Device { name, kv_bytes_per_element, build }
}

/// The name the twin backend reports as its device.
pub const TWIN_DEVICE: &str = "cuda twins (host)";

pub fn twin_backend() -> Backend {
    twin_backend_with(true, false)
}

/// The twin backend with its bf16 roundings off: the device's operations in plain f32, for
/// comparisons with the CPU backend that are exact up to summation order.
pub fn exact_twin_backend() -> Backend {
    twin_backend_with(false, false)
}

/// The twin backend with decode-step replay on, as a server on a GPU has it: the twins record
/// nothing, so every decode step runs padded to its bucket, padding rows and all.
pub fn padding_twin_backend() -> Backend {
    twin_backend_with(true, true)
}

fn twin_backend_with(rounding: bool, replay: bool) -> Backend {
    Backend::Device {
        name: TWIN_DEVICE.into(),
        kv_bytes_per_element: 2,
        build: Box::new(move |model, cache| {
            // The build runs on the engine thread, which runs every forward after it.
            if !rounding {
                coserve::backend::cuda::twins::stop_rounding_on_this_thread();
            }
            let h = from_llama(&model, cache.block_size).map_err(|e| e.to_string())?;
            let (n, r) = (cache.num_blocks, cache.max_rows);
            let mut d = DeviceDecoder::new(HostOps, h.shape, h.weights, h.inv_freq, n, r)
                .map_err(|e| e.to_string())?;
            d.replay_decodes(replay);
            Ok(Box::new(d) as Box<dyn DeviceModel>)
        }),
    }
}

/// The CUDA toolkit (NVRTC) for tests that compile kernels: `None` (the test skips, saying
/// why) when there is none, unless `COSERVE_REQUIRE_CUDA_TOOLKIT` is set, as `.ci/run` does.
pub fn toolkit_or_skip() -> Option<coserve::backend::cuda::toolkit::Toolkit> {
    match coserve::backend::cuda::toolkit::Toolkit::find() {
        Ok(t) => Some(t),
        Err(e) if std::env::var_os("COSERVE_REQUIRE_CUDA_TOOLKIT").is_some() => {
            panic!("COSERVE_REQUIRE_CUDA_TOOLKIT is set but: {e}")
        }
        Err(e) => {
            eprintln!("skipped, no CUDA toolkit: {e}");
            None
        }
    }
}
