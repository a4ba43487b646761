//! Memory read bandwidth of this machine, the bound of batch-1 decode: every weight is read
//! once per step, so `weight bytes / this bandwidth` is the fastest a step can be. Sums a
//! 512 MiB buffer (far beyond any cache) on the rayon pool (`COSERVE_THREADS`, default all
//! cores), reported as bytes per second: once as plain Rust (what the compiler makes of it for
//! the baseline target), once with AVX2 loads and a software prefetch 1 KiB ahead, the way the
//! matmul kernels read their weights (x86_64 with AVX2 only).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;

const BYTES: usize = 512 << 20;
/// Floats per task: large sequential runs, as a weight panel or row is read.
const CHUNK: usize = 1 << 16;

fn read_bandwidth(c: &mut Criterion) {
    let threads = std::env::var("COSERVE_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let data: Vec<f32> = (0..BYTES / 4).map(|i| (i % 7) as f32).collect();
    let mut group = c.benchmark_group("memory");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.bench_function("read_512MiB", |b| {
        b.iter(|| {
            // 32 independent sums (four vectors of adds in flight) so the adds never limit
            // the loads.
            pool.install(|| {
                data.par_chunks(CHUNK)
                    .map(|c| {
                        let mut acc = [[0f32; 8]; 4];
                        for v in c.chunks_exact(32) {
                            for (a, x) in acc.iter_mut().zip(v.chunks_exact(8)) {
                                for (a, x) in a.iter_mut().zip(x) {
                                    *a += x;
                                }
                            }
                        }
                        acc.iter().flatten().sum::<f32>()
                    })
                    .sum::<f32>()
            })
        })
    });
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        group.bench_function("read_512MiB_avx2_prefetch", |b| {
            b.iter(|| {
                pool.install(|| {
                    // SAFETY: AVX2 is available.
                    data.par_chunks(CHUNK).map(|c| unsafe { sum_avx2(c) }).sum::<f32>()
                })
            })
        });
    }
    group.finish();
}

/// Sum of `c` with four vector accumulators, prefetching 1 KiB ahead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let p = c.as_ptr();
    let whole = c.len() / 32 * 32;
    for i in (0..whole).step_by(32) {
        _mm_prefetch::<_MM_HINT_T0>(p.add(i).wrapping_add(256) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(p.add(i).wrapping_add(256 + 16) as *const i8);
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(i + 8 * k)));
        }
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(
        lanes.as_mut_ptr(),
        _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
    );
    lanes.iter().sum::<f32>() + c[whole..].iter().sum::<f32>()
}

criterion_group!(benches, read_bandwidth);
criterion_main!(benches);
