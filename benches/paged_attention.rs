//! Paged attention micro-benchmark: one layer of the default model's shape (9 heads, 3 kv
//! heads, head_dim 64, blocks of 16) for decode batches and for one prefill chunk, with the
//! cache in f32 and in f16 (`_f16`).

use coserve::backend::cpu::paged_attention::{paged_attention, AttnSeq, AttnShape};
use coserve::backend::cpu::KvElement;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SHAPE: AttnShape =
    AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64, block_size: 16, scale: 0.125 };

/// A cache holding `num_seqs` contexts of `context_len` tokens in shuffled blocks, and their
/// block tables.
fn setup<E: KvElement>(num_seqs: usize, context_len: usize) -> (Vec<E>, Vec<E>, Vec<Vec<u32>>) {
    let mut rng = StdRng::seed_from_u64(0);
    let blocks_per_seq = context_len.div_ceil(SHAPE.block_size);
    let num_blocks = num_seqs * blocks_per_seq;
    let len = num_blocks * SHAPE.block_size * SHAPE.num_kv_heads * SHAPE.head_dim;
    let k: Vec<E> = (0..len).map(|_| E::from_f32(rng.random_range(-1.0..1.0))).collect();
    let v: Vec<E> = (0..len).map(|_| E::from_f32(rng.random_range(-1.0..1.0))).collect();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let tables = ids.chunks(blocks_per_seq).map(<[u32]>::to_vec).collect();
    (k, v, tables)
}

fn bench<E: KvElement>(
    c: &mut Criterion,
    name: &str,
    num_seqs: usize,
    context_len: usize,
    q_len: usize,
) {
    let (k, v, tables) = setup::<E>(num_seqs, context_len);
    let seqs: Vec<AttnSeq> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| AttnSeq { q_start: i * q_len, q_len, context_len, block_table: t })
        .collect();
    let mut rng = StdRng::seed_from_u64(1);
    let row = SHAPE.num_heads * SHAPE.head_dim;
    let q: Vec<f32> = (0..num_seqs * q_len * row).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0f32; q.len()];
    let mut group = c.benchmark_group("paged_attention");
    group.throughput(Throughput::Elements((num_seqs * q_len) as u64));
    group.bench_function(name, |b| {
        b.iter(|| paged_attention(&q, &k, &v, &seqs, &SHAPE, &mut out));
    });
    group.finish();
}

/// A decode step of `num_seqs` sequences through `layers` layers, each with its own cache, so
/// K and V come from memory as in a real step rather than from a warm cache.
fn bench_layers<E: KvElement>(
    c: &mut Criterion,
    name: &str,
    num_seqs: usize,
    context_len: usize,
    layers: usize,
) {
    let caches: Vec<_> = (0..layers).map(|_| setup::<E>(num_seqs, context_len)).collect();
    let seqs: Vec<Vec<AttnSeq>> = caches
        .iter()
        .map(|(_, _, tables)| {
            tables
                .iter()
                .enumerate()
                .map(|(i, t)| AttnSeq { q_start: i, q_len: 1, context_len, block_table: t })
                .collect()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(1);
    let row = SHAPE.num_heads * SHAPE.head_dim;
    let q: Vec<f32> = (0..num_seqs * row).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = vec![0f32; q.len()];
    let mut group = c.benchmark_group("paged_attention");
    group.sample_size(20);
    group.throughput(Throughput::Elements((num_seqs * layers) as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            for ((k, v, _), s) in caches.iter().zip(&seqs) {
                paged_attention(&q, k, v, s, &SHAPE, &mut out);
            }
        });
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench::<f32>(c, "decode_16x512", 16, 512, 1);
    bench::<f16>(c, "decode_16x512_f16", 16, 512, 1);
    bench::<f32>(c, "prefill_512", 1, 512, 512);
    bench::<f16>(c, "prefill_512_f16", 1, 512, 512);
    bench::<f32>(c, "decode_1x1024", 1, 1024, 1);
    bench::<f16>(c, "decode_1x1024_f16", 1, 1024, 1);
    bench_layers::<f32>(c, "decode_64x160_30_layers", 64, 160, 30);
    bench_layers::<f16>(c, "decode_64x160_30_layers_f16", 64, 160, 30);
}

criterion_group!(paged, benches);
criterion_main!(paged);
