//! One decode step's linear layers of the default model (SmolLM2-135M: 30 layers of fused
//! q/k/v [960, 576], o [576, 576], gate/up [3072, 576], down [576, 1536], plus the tied
//! [49152, 576] head) for each weight format, at batch 1, 16 and 64. Weights are random values
//! of the real shapes (the gguf case uses the default file's types: Q4_1 layers, Q8_0 head).
//! Throughput is reported in weight bytes read per second: decode on a CPU is bound by it.
//! `f32-rows` is the row-major dot-product kernel (what bf16 uses) on the same f32 weights, for
//! comparison with the panel-packed f32 kernel in one run.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use coserve::backend::cpu::matmul::matmul_t;
use coserve::model::weights::{WeightMatrix, WeightsDtype};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 576;
const LAYERS: usize = 30;
const SHAPES: [(usize, usize); 4] =
    [(960, HIDDEN), (HIDDEN, HIDDEN), (3072, HIDDEN), (HIDDEN, 1536)];
const VOCAB: usize = 49152;

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

fn matrix(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    dtype: WeightsDtype,
    file: GgmlDType,
) -> WeightMatrix {
    let data = random(rng, rows * cols, 0.05);
    if dtype != WeightsDtype::Gguf {
        return WeightMatrix::from_f32_as(data, rows, cols, dtype).expect("shape");
    }
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, file).expect("quantize");
    WeightMatrix::from_ggml(file, &q.data().expect("bytes"), rows, cols).expect("ggml matrix")
}

/// Every weight of one decode step: per layer the four projections, then the head.
fn model(dtype: WeightsDtype) -> Vec<WeightMatrix> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut out = Vec::new();
    for _ in 0..LAYERS {
        for (rows, cols) in SHAPES {
            out.push(matrix(&mut rng, rows, cols, dtype, GgmlDType::Q4_1));
        }
    }
    out.push(matrix(&mut rng, VOCAB, HIDDEN, dtype, GgmlDType::Q8_0));
    out
}

/// One group: `step(x, m, out)` runs every matmul of a decode step at batch `m`.
fn bench_group(
    c: &mut Criterion,
    pool: &rayon::ThreadPool,
    name: &str,
    bytes: usize,
    step: impl Fn(&[f32], usize, &mut [f32]) + Sync,
) {
    let mut group = c.benchmark_group(format!("decode_step_matmuls/{name}"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    for batch in [1usize, 16, 64] {
        let mut rng = StdRng::seed_from_u64(batch as u64);
        let x = random(&mut rng, batch * 1536, 1.0);
        let mut out = vec![0f32; batch * VOCAB];
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &m| {
            b.iter(|| pool.install(|| step(&x, m, &mut out)))
        });
    }
    group.finish();
}

fn decode_step(c: &mut Criterion) {
    let threads = std::env::var("COSERVE_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    for dtype in [WeightsDtype::F32, WeightsDtype::Bf16, WeightsDtype::Q8_0, WeightsDtype::Gguf] {
        let weights = model(dtype);
        let bytes: usize = weights.iter().map(WeightMatrix::size_bytes).sum();
        bench_group(c, &pool, &dtype.to_string(), bytes, |x, m, out| {
            for w in &weights {
                w.forward(&x[..m * w.cols], m, &mut out[..m * w.rows]);
            }
        });
    }
    // The same f32 shapes, row-major, through the dot-product kernel.
    let mut rng = StdRng::seed_from_u64(7);
    let mut shapes: Vec<(usize, usize)> = (0..LAYERS).flat_map(|_| SHAPES).collect();
    shapes.push((VOCAB, HIDDEN));
    let rows: Vec<(usize, usize, Vec<f32>)> =
        shapes.iter().map(|&(n, k)| (n, k, random(&mut rng, n * k, 0.05))).collect();
    let bytes: usize = rows.iter().map(|(n, k, _)| n * k * 4).sum();
    bench_group(c, &pool, "f32-rows", bytes, |x, m, out| {
        for (n, k, w) in &rows {
            matmul_t(&x[..m * k], w, m, *k, *n, &mut out[..m * n]);
        }
    });
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
