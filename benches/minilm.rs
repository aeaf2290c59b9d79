//! all-MiniLM-L6-v2 forward on sentences 0–31 as one padded batch (32 × 25, 548 real tokens):
//! the dense model against its factorized variants, side by side in one run, and what each part
//! of a dense layer costs. Needs `../shared/data/minilm-model` (skips with a line otherwise).
//!
//! `cargo bench --bench minilm`

#[path = "../examples/minilm/bert.rs"]
#[allow(dead_code)]
mod bert;
#[path = "../examples/minilm/checkpoint.rs"]
mod checkpoint;
#[path = "../examples/minilm/text.rs"]
#[allow(dead_code)]
mod text;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dfdx::nn::modules::AccurateGeLU;
use dfdx::prelude::*;
use factorize_runtime::fast::{self, FastForward};
use factorize_runtime::{Factorizable, FactorizeConfig};

use bert::{Batch, Bert};

fn setup() -> Option<(Cpu, text::ModelDir, Batch<f32, Cpu>)> {
    let dir = text::ModelDir::locate();
    if !dir.exists() {
        eprintln!("skipped: no MiniLM model at {}", dir.0.display());
        return None;
    }
    let dev: Cpu = Default::default();
    let tokenizer = dir.tokenizer().ok()?;
    let (sentences, _) = dir.sentences().ok()?;
    let ids: Vec<Vec<u32>> = sentences[..32]
        .iter()
        .map(|s| tokenizer.encode(s))
        .collect::<Result<_, _>>()
        .ok()?;
    let batch = Batch::new(&dev, &ids);
    Some((dev, dir, batch))
}

fn models(c: &mut Criterion) {
    let Some((dev, dir, batch)) = setup() else {
        return;
    };
    let cfg = FactorizeConfig {
        progress: false,
        ..Default::default()
    };
    let dense = Bert::<64, f32, Cpu>::load(dir.checkpoint(), &dev).expect("checkpoint");
    let r64 = dense.factorize(&cfg).expect("rank 64");
    let r128 = Bert::<128, f32, Cpu>::load(dir.checkpoint(), &dev)
        .expect("checkpoint")
        .factorize(&cfg)
        .expect("rank 128");
    let mut g = c.benchmark_group("minilm_batch32");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("dense", |b| b.iter(|| dense.try_embed(&batch).unwrap()));
    g.bench_function("rank64", |b| b.iter(|| r64.try_embed(&batch).unwrap()));
    g.bench_function("rank128", |b| b.iter(|| r128.try_embed(&batch).unwrap()));
    g.finish();

    // One dense layer, part by part, on the batch's 800 position rows.
    let x = dense.embeddings.try_forward(&batch).unwrap();
    let layer = &dense.layers.modules[0];
    let h = layer.ffn.up.forward_fast(x.clone());
    let mut g = c.benchmark_group("minilm_dense_layer");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    g.bench_function("embeddings", |b| {
        b.iter(|| dense.embeddings.try_forward(&batch).unwrap())
    });
    g.bench_function("attention_block", |b| {
        b.iter(|| layer.attention.try_forward(x.clone(), &batch).unwrap())
    });
    let (q, k, v) = (
        layer.attention.query.forward_fast(x.clone()),
        layer.attention.key.forward_fast(x.clone()),
        layer.attention.value.forward_fast(x.clone()),
    );
    g.bench_function("attention_fused", |b| {
        b.iter(|| {
            fast::attention::<12, 32, 384, f32, Cpu>(&q, &k, &v, &batch.lengths, batch.positions)
                .unwrap()
        })
    });
    g.bench_function("ffn_block", |b| {
        b.iter(|| layer.ffn.try_forward(x.clone()).unwrap())
    });
    g.bench_function("linear_384x384", |b| {
        b.iter(|| layer.attention.query.forward_fast(x.clone()))
    });
    g.bench_function("linear_384x1536", |b| {
        b.iter(|| layer.ffn.up.forward_fast(x.clone()))
    });
    g.bench_function("linear_1536x384", |b| {
        b.iter(|| layer.ffn.down.forward_fast(h.clone()))
    });
    g.bench_function("gelu_erf", |b| {
        b.iter(|| AccurateGeLU.forward_fast(h.clone()))
    });
    g.bench_function("layer_norm", |b| {
        b.iter(|| layer.ffn.norm.forward_fast(x.clone()))
    });
    g.bench_function("linear_384x1536_dfdx", |b| {
        b.iter(|| layer.ffn.up.forward(x.clone()))
    });
    g.bench_function("gelu_erf_dfdx", |b| {
        b.iter(|| AccurateGeLU.forward(h.clone()))
    });
    g.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);
