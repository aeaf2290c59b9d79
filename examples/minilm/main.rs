//! all-MiniLM-L6-v2, a real pretrained sentence encoder, factorized by the derive and measured
//! on sentences.
//!
//! ```sh
//! cargo run --release --example minilm                 # the table: 5 ranks × 3 fits vs dense
//! cargo run --release --example minilm -- embed sentences.txt out.safetensors
//! cargo run --release --example minilm -- --rank 64 --fit data embed sentences.txt out.safetensors
//! cargo run --release --example minilm -- frontier    # the route, 12.5–75%: tables, figures
//! cargo run --release --example minilm -- planned     # the committed plans, compiled
//! cargo run --release --example minilm -- --macs 25 embed sentences.txt out.safetensors
//! cargo run --release --example minilm -- --macs 50 --distill 100 embed in.txt out.safetensors
//! cargo run --release --example minilm -- --macs 50 --distill 1000 --augment 20 --lr 3e-4 embed in.txt out.safetensors
//! cargo run --release --example minilm -- --macs 25 --fit-copies 20 --distill 2000 --augment 20 --lr 3e-4 embed in.txt out.safetensors
//! cargo run --release --example minilm -- --macs 50 --fit-copies 20 --distill 3000 --augment 40 --lr 3e-4 --schedule cosine embed in.txt out.safetensors
//! cargo run --release --example minilm -- recovery    # train after factorizing: before/after
//! cargo run --release --example minilm -- recovery --steps 500 --lr 1e-4 --on embeddings
//! cargo run --release --example minilm -- recovery --macs 50 --augment 20 --steps 1000 --lr 3e-4
//! ```
//!
//! `embed` writes `embeddings` (`[n, 384]`, float32, normalised, in line order) for one sentence
//! per line, with the dense model or, after `--rank R --fit svd|data|correcting`, with that
//! variant (`data` and `correcting` are calibrated on sentences 0–119), or after `--macs 25|50`
//! with the planned variant of `planned.rs` (correcting fit). `--fit-copies COPIES` calibrates
//! the data-aware fits on that many varied copies of each calibration sentence too
//! (`augment.rs`: words replaced by their neighbours in the model's word embeddings).
//! `--distill STEPS` then trains the variant's factors for that many Adam steps towards the
//! dense model (`recovery.rs`), on the calibration sentences and, with `--augment COPIES`, that
//! many varied copies of each; `--lr` sets the learning rate, `--schedule cosine` puts it on a
//! cosine schedule with warm-up, `--train all` trains every tensor instead of the factors
//! alone (Composer trains the whole model after factorizing), `--on layers` matches every
//! encoder layer's hidden states instead of the last (`embeddings`: the sentence embeddings).
//! `--corpus LINES` (training) and `--fit-corpus LINES` (the fits) add that many lines of real
//! text: the WordNet examples shipped in `corpus/`, or the file `$FACTORIZE_MINILM_CORPUS`
//! names. The data comes from `../shared/data/minilm-model` or `$FACTORIZE_MINILM_MODEL_DIR`.
//! These options, before `embed`, describe its variant; `frontier` and `recovery` take theirs
//! after their name, and an option in the wrong place is an error (`cli.rs`).
//!
//! The model (`bert.rs`), its loader (`checkpoint.rs`) and the tokenizer (`text.rs`) are meant
//! to be copied as a template.

mod augment;
mod bert;
mod checkpoint;
mod cli;
mod frontier;
mod metrics;
mod pipeline;
mod planned;
mod plot;
mod recovery;
mod text;

use dfdx::prelude::*;

use bert::{Batch, Bert, FFN, HIDDEN, LAYERS};
use cli::{Command, Variant, RANKS};
use pipeline::{by_length, embed_all, factorize, median, recover, seconds};
use pipeline::{training_targets, Error, FitData, FitKind, Training};

/// Timed forwards per model (interleaved dense / factorized; the median is reported).
const TIMED_RUNS: usize = 9;
/// The timed batch: sentences 0–31 padded into one batch.
const TIMED_BATCH: std::ops::Range<usize> = 0..32;

/// The dense model; its rank parameter is unused.
type Dense = Bert<0, f32, Cpu>;

/// Everything measured once and shared by all variants.
struct Setup {
    dev: Cpu,
    dir: text::ModelDir,
    tokenizer: text::Tokenizer,
    ids: Vec<Vec<u32>>,
    dense: Dense,
    dense_heldout: Vec<f32>,
    timed: Batch<f32, Cpu>,
    calibration: Vec<(Vec<usize>, Batch<f32, Cpu>)>,
}

impl Setup {
    fn new() -> Result<Self, Error> {
        let dev: Cpu = Default::default();
        let dir = text::ModelDir::locate();
        if !dir.exists() {
            return Err(format!(
                "no checkpoint at {} (set FACTORIZE_MINILM_MODEL_DIR)",
                dir.checkpoint().display()
            )
            .into());
        }
        let tokenizer = dir.tokenizer()?;
        let (sentences, _) = dir.sentences()?;
        let ids = sentences
            .iter()
            .map(|s| tokenizer.encode(s))
            .collect::<Result<Vec<_>, _>>()?;
        let dense = Dense::load(dir.checkpoint(), &dev)?;
        let heldout = &ids[pipeline::HELD_OUT];
        let dense_heldout = embed_all(&dev, heldout, |b| dense.try_embed(b))?;
        let timed = Batch::new(&dev, &ids[TIMED_BATCH]);
        let calibration = by_length(&dev, &ids[pipeline::CALIBRATION]);
        Ok(Self {
            dev,
            dir,
            tokenizer,
            ids,
            dense,
            dense_heldout,
            timed,
            calibration,
        })
    }

    /// The dense model and the tokenizer, as [`training_targets`] takes them.
    fn models(&self) -> (&Dense, &text::Tokenizer) {
        (&self.dense, &self.tokenizer)
    }
}

/// One line of the table.
struct Row {
    rank: usize,
    fit: FitKind,
    macs: (usize, usize),
    params: (usize, usize),
    fidelity: metrics::Fidelity,
    dense_seconds: f64,
    seconds: f64,
    factorize_seconds: f64,
}

fn measure<const R: usize>(setup: &Setup, fit: FitKind) -> Result<Row, Error> {
    let dense = Bert::<R, f32, Cpu>::load(setup.dir.checkpoint(), &setup.dev)?;
    let (small, report, took) = factorize(&dense, fit, &setup.calibration)?;
    let heldout = &setup.ids[pipeline::HELD_OUT];
    let ours = embed_all(&setup.dev, heldout, |b| small.try_embed(b))?;
    let fidelity = metrics::fidelity(&ours, &setup.dense_heldout);
    let (mut dense_times, mut times) = (Vec::new(), Vec::new());
    for _ in 0..TIMED_RUNS {
        dense_times.push(seconds(|| {
            let _ = setup.dense.try_embed(&setup.timed);
        }));
        times.push(seconds(|| {
            let _ = small.try_embed(&setup.timed);
        }));
    }
    Ok(Row {
        rank: R,
        fit,
        macs: report.total_macs(),
        params: report.total_params(),
        fidelity,
        dense_seconds: median(dense_times),
        seconds: median(times),
        factorize_seconds: took.as_secs_f64(),
    })
}

fn table() -> Result<(), Error> {
    let setup = Setup::new()?;
    let tokens = setup.timed.tokens();
    let positions = setup.timed.positions;
    // Per token and layer, Q·Kᵀ and probs·V each take `positions · HIDDEN` multiply-adds.
    let attention_macs = LAYERS * 2 * positions * HIDDEN;
    let mut rows = Vec::new();
    for rank in RANKS {
        for fit in [FitKind::Svd, FitKind::Data, FitKind::Correcting] {
            eprintln!("rank {rank}, {fit:?} …");
            rows.push(match rank {
                32 => measure::<32>(&setup, fit)?,
                64 => measure::<64>(&setup, fit)?,
                96 => measure::<96>(&setup, fit)?,
                128 => measure::<128>(&setup, fit)?,
                _ => measure::<160>(&setup, fit)?,
            });
        }
    }
    let dense_macs = rows[0].macs.0;
    let dense_params = rows[0].params.0;
    let dense_seconds = median(rows.iter().map(|r| r.dense_seconds).collect());
    println!(
        "all-MiniLM-L6-v2, all {} Linears factorized at one rank; fidelity on held-out sentences {}–{} against the dense model",
        LAYERS * 6,
        pipeline::HELD_OUT.start,
        pipeline::HELD_OUT.end - 1
    );
    println!(
        "speed: sentences {}–{} as one padded batch ({} × {positions}, {tokens} real tokens), this CPU, median of {TIMED_RUNS} interleaved runs\n",
        TIMED_BATCH.start,
        TIMED_BATCH.end - 1,
        TIMED_BATCH.len()
    );
    println!(
        "| rank | fit | linear MACs/token | attention share | linear params | mean cos | min cos | NN agree | Spearman | tokens/s | speed-up | factorize |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| dense | – | {:.2} M | {:.1}% | {:.2} M | 1 | 1 | 100% | 1 | {:.0} | 1.00x | – |",
        dense_macs as f64 / 1e6,
        100.0 * attention_macs as f64 / (dense_macs + attention_macs) as f64,
        dense_params as f64 / 1e6,
        tokens as f64 / dense_seconds
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.2} M ({:.0}%) | {:.1}% | {:.2} M | {:.4} | {:.4} | {:.0}% | {:.4} | {:.0} | {:.2}x | {:.2} s |",
            r.rank,
            match r.fit {
                FitKind::Svd => "weight SVD",
                FitKind::Data => "data-aware",
                FitKind::Correcting => "correcting",
            },
            r.macs.1 as f64 / 1e6,
            100.0 * r.macs.1 as f64 / dense_macs as f64,
            100.0 * attention_macs as f64 / (r.macs.1 + attention_macs) as f64,
            r.params.1 as f64 / 1e6,
            r.fidelity.mean_cosine,
            r.fidelity.min_cosine,
            100.0 * r.fidelity.neighbour_agreement,
            r.fidelity.spearman,
            tokens as f64 / r.seconds,
            r.dense_seconds / r.seconds,
            r.factorize_seconds,
        );
    }
    println!(
        "\nlinear MACs/token: multiply-adds of the 36 Linears per token (dense {FFN}-wide FFN and four {HIDDEN}² projections per layer);"
    );
    println!(
        "attention share: Q·Kᵀ and probs·V (not factorized) as a share of all multiply-adds at this batch's length;"
    );
    println!(
        "speed-up: dense time / factorized time, each row timed against the dense model interleaved; NN agree: each sentence's most similar other sentence is the same as under the dense model."
    );
    Ok(())
}

/// The planned variants against the dense model: held-out fidelity and speed.
fn planned_table() -> Result<(), Error> {
    let setup = Setup::new()?;
    let heldout = &setup.ids[pipeline::HELD_OUT];
    println!(
        "| plan | linear MACs/token | mean cos | NN agree | speed-up (median of {TIMED_RUNS}, interleaved) |"
    );
    println!("|---|---|---|---|---|");
    for macs in [25, 50] {
        let (f, (dense_macs, ours), speed) = planned::measure(
            macs,
            &setup.dense,
            &setup.calibration,
            (heldout, &setup.dense_heldout),
            (&setup.timed, TIMED_RUNS),
        )?;
        println!(
            "| {macs}% | {:.2} M ({:.0}%) | {:.4} | {:.0}% | {speed:.2}x |",
            ours as f64 / 1e6,
            100.0 * ours as f64 / dense_macs as f64,
            f.mean_cosine,
            100.0 * f.neighbour_agreement
        );
    }
    Ok(())
}

/// `embed <sentences.txt> <out.safetensors>` with the dense model or a variant.
fn embed(
    (variant, fit_data): (Option<Variant>, FitData),
    training: &Training,
    input: &str,
    output: &str,
) -> Result<(), Error> {
    let dev: Cpu = Default::default();
    let dir = text::ModelDir::locate();
    let tokenizer = dir.tokenizer()?;
    let text = std::fs::read_to_string(input).map_err(|e| format!("cannot read {input}: {e}"))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return Err(format!("{input} has no sentences (one per line)").into());
    }
    let ids = lines
        .iter()
        .map(|s| tokenizer.encode(s))
        .collect::<Result<Vec<_>, _>>()?;
    let embeddings = match variant {
        None => {
            let dense = Dense::load(dir.checkpoint(), &dev)?;
            embed_all(&dev, &ids, |b| dense.try_embed(b))?
        }
        Some(Variant::Planned(macs)) => {
            let dense = Dense::load(dir.checkpoint(), &dev)?;
            let calibration_ids = calibration_ids(&dir, &tokenizer)?;
            let fitted_on = fit_data.sentences(&dense, &calibration_ids, &tokenizer)?;
            let calibration = by_length(&dev, &fitted_on);
            planned::embed_planned(
                macs,
                (&dense, &tokenizer),
                &calibration,
                (&ids, &calibration_ids),
                training,
            )?
        }
        Some(Variant::Rank(rank, fit)) => match rank {
            32 => embed_variant::<32>(&dev, &dir, &tokenizer, (fit, fit_data, training), &ids)?,
            64 => embed_variant::<64>(&dev, &dir, &tokenizer, (fit, fit_data, training), &ids)?,
            96 => embed_variant::<96>(&dev, &dir, &tokenizer, (fit, fit_data, training), &ids)?,
            128 => embed_variant::<128>(&dev, &dir, &tokenizer, (fit, fit_data, training), &ids)?,
            160 => embed_variant::<160>(&dev, &dir, &tokenizer, (fit, fit_data, training), &ids)?,
            other => return Err(format!("--rank takes one of {RANKS:?}, not {other}").into()),
        },
    };
    let bytes: Vec<u8> = embeddings.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = ::safetensors::tensor::TensorView::new(
        ::safetensors::Dtype::F32,
        vec![lines.len(), HIDDEN],
        &bytes,
    )
    .map_err(|e| format!("{e:?}"))?;
    ::safetensors::serialize_to_file([("embeddings", view)], &None, output.as_ref())
        .map_err(|e| format!("cannot write {output}: {e:?}"))?;
    eprintln!("wrote {} embeddings to {output}", lines.len());
    Ok(())
}

/// The token ids of the calibration sentences (0–119).
fn calibration_ids(
    dir: &text::ModelDir,
    tokenizer: &text::Tokenizer,
) -> Result<Vec<Vec<u32>>, Error> {
    let (sentences, _) = dir.sentences()?;
    Ok(sentences[pipeline::CALIBRATION]
        .iter()
        .map(|s| tokenizer.encode(s))
        .collect::<Result<Vec<_>, _>>()?)
}

fn embed_variant<const R: usize>(
    dev: &Cpu,
    dir: &text::ModelDir,
    tokenizer: &text::Tokenizer,
    (fit, fit_data, training): (FitKind, FitData, &Training),
    ids: &[Vec<u32>],
) -> Result<Vec<f32>, Error> {
    let dense = Bert::<R, f32, Cpu>::load(dir.checkpoint(), dev)?;
    let calibration_ids = calibration_ids(dir, tokenizer)?;
    // Weight SVD reads no data: nothing more to make.
    let fit_data = if fit == FitKind::Svd {
        FitData::default()
    } else {
        fit_data
    };
    let calibration = by_length(
        dev,
        &fit_data.sentences(&dense, &calibration_ids, tokenizer)?,
    );
    let (mut small, _, _) = factorize(&dense, fit, &calibration)?;
    if training.steps > 0 {
        let targets = training_targets((&dense, tokenizer), &calibration_ids, training)?;
        recover(&mut small, &targets, training)?;
    }
    embed_all(dev, ids, |b| small.try_embed(b))
}

/// Checks that the corpus has the lines `--corpus` and `--fit-corpus` ask for, before hours
/// of fitting and training reach them.
fn check_corpus(training: &Training, fit_corpus: usize) -> Result<(), String> {
    for (flag, n) in [("--corpus", training.corpus), ("--fit-corpus", fit_corpus)] {
        text::check_corpus(n).map_err(|e| format!("{flag}: {e}"))?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Vec<String>) -> Result<(), Error> {
    match cli::parse(&args)? {
        Command::Table => table(),
        Command::Planned => planned_table(),
        Command::Frontier {
            sentences,
            fit,
            training,
        } => {
            check_corpus(&training, fit.corpus)?;
            frontier::frontier(sentences, (fit, &training))
        }
        Command::Recovery { training, budgets } => {
            check_corpus(&training, 0)?;
            recovery::recovery(&training, &budgets)
        }
        Command::Embed {
            variant,
            fit,
            training,
            input,
            output,
        } => {
            check_corpus(&training, fit.corpus)?;
            embed((variant, fit), &training, &input, &output)
        }
    }
}
