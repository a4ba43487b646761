//! Memory read bandwidth of this machine, the bound of batch-1 decode: every weight is read
//! once per step, so `weight bytes / this bandwidth` is the fastest a step can be. Sums a
//! 512 MiB buffer (far beyond any cache) on the rayon pool (`COSERVE_THREADS`, default all
//! cores), reported as bytes per second.

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
    group.finish();
}

criterion_group!(benches, read_bandwidth);
criterion_main!(benches);
