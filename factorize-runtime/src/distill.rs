//! Recovery by training: distillation of a factorized variant to its dense model.
//!
//! Composer's `Factorize` factorizes, then trains; this crate factorizes well (data-aware and
//! correcting fits, ranks by measured damage), and can then train a little. [`distill`] trains
//! the variant with Adam to reproduce the dense model's outputs on calibration inputs: the
//! factorized pairs alone ([`Trained::Factors`], the rest of the model stays the pretrained one)
//! or every tensor ([`Trained::All`]). It returns the loss of every step.
//!
//! The model's forward must be generic over the tape (see `examples/finetune.rs`): `distill`
//! calls it with traced inputs.
//!
//! ```
//! use dfdx::nn::modules::{Linear, ReLU};
//! use dfdx::prelude::*;
//! use factorize_runtime::distill::{distill, DistillConfig};
//! use factorize_runtime::{mirror, Factorizable, FactorizeConfig, TensorCollection};
//!
//! #[derive(Factorizable, TensorCollection)]
//! #[factorize(latent_features = 16)]
//! pub struct Mlp<E: Dtype, D: Device<E>> {
//!     pub fc1: Linear<256, 256, E, D>,
//!     pub act: ReLU,
//!     pub fc2: Linear<256, 8, E, D>,
//! }
//!
//! #[mirror]
//! impl<E: Dtype, D: Device<E>, B: Dim, T: Tape<E, D>> Module<Tensor<(B, Const<256>), E, D, T>>
//!     for Mlp<E, D>
//! {
//!     type Output = Tensor<(B, Const<8>), E, D, T>;
//!     type Error = D::Err;
//!     fn try_forward(&self, x: Tensor<(B, Const<256>), E, D, T>) -> Result<Self::Output, D::Err> {
//!         self.fc2.try_forward(self.act.try_forward(self.fc1.try_forward(x)?)?)
//!     }
//! }
//!
//! let dev = Cpu::seed_from_u64(0);
//! let dense = Mlp::<f32, Cpu>::build(&dev);
//! let mut small = dense.factorize(&FactorizeConfig::default())?;
//! // Calibration inputs, and what the dense model makes of them.
//! let batches: Vec<_> = (0..4)
//!     .map(|_| {
//!         let x: Tensor<Rank2<32, 256>, f32, Cpu> = dev.sample_normal();
//!         let y = dense.forward(x.clone());
//!         (x, y)
//!     })
//!     .collect();
//! let cfg = DistillConfig { steps: 20, learning_rate: 1e-3, progress: false, ..Default::default() };
//! let log = distill(&mut small, &batches, &cfg, |m: &MlpFactorized<f32, Cpu>, x, grads| {
//!     m.try_forward(x.clone().traced(grads))
//! })?;
//! assert!(log.last(4) < log.first(4));
//! # Ok::<(), factorize_runtime::FactorizeError>(())
//! ```

use std::ops::Range;
use std::time::{Duration, Instant};

use dfdx::optim::{Adam, AdamConfig, Optimizer, OptimizerUpdateError, Sgd, SgdConfig};
use dfdx::prelude::*;

use crate::calibrate::VisitFactorized;
use crate::error::FactorizeError;
use crate::progress::Steps;

/// Which of the variant's tensors [`distill`] trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trained {
    /// The factorized pairs' factors and biases; every other tensor keeps its pretrained value.
    #[default]
    Factors,
    /// Every tensor of the variant.
    All,
}

/// How the learning rate moves over the steps of [`distill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The learning rate at every step.
    #[default]
    Constant,
    /// A linear warm-up to the learning rate over the first `warmup` steps, then a cosine decay
    /// towards zero at the last step: the schedule BERT-style models are fine-tuned with, which
    /// lets the last steps settle instead of jumping around the optimum at full rate.
    Cosine {
        /// Steps of the warm-up; fewer than the training's steps.
        warmup: usize,
    },
}

impl Schedule {
    /// The learning rate at `step` (counted from 0) of `steps`, for a peak rate `peak`; zero
    /// from `steps` on under the cosine.
    ///
    /// ```
    /// use factorize_runtime::distill::Schedule;
    /// let cosine = Schedule::Cosine { warmup: 10 };
    /// assert_eq!(cosine.rate(1e-3, 4, 110), 5e-4); // half-way up
    /// assert_eq!(cosine.rate(1e-3, 9, 110), 1e-3); // the peak
    /// assert!((cosine.rate(1e-3, 60, 110) - 5e-4).abs() < 1e-12); // half-way down
    /// assert_eq!(cosine.rate(1e-3, 200, 110), 0.0);
    /// assert_eq!(Schedule::Constant.rate(1e-3, 60, 110), 1e-3);
    /// ```
    pub fn rate(&self, peak: f64, step: usize, steps: usize) -> f64 {
        match *self {
            Self::Constant => peak,
            Self::Cosine { warmup } if step < warmup => peak * (step + 1) as f64 / warmup as f64,
            Self::Cosine { warmup } => {
                // Past the last step (or with no decay steps) the rate stays at zero.
                let decay = steps.saturating_sub(warmup).max(1) as f64;
                let done = ((step - warmup) as f64 / decay).min(1.0);
                peak * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
            }
        }
    }
}

/// How [`distill`] trains: Adam (dfdx's, its default betas and epsilon) on the mean squared
/// error against the dense model's outputs, one batch per step, the batches in turn.
#[derive(Debug, Clone)]
pub struct DistillConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Adam's learning rate (its peak under a [`Schedule::Cosine`]).
    pub learning_rate: f64,
    /// How the learning rate moves over the steps.
    pub schedule: Schedule,
    /// What is trained.
    pub trained: Trained,
    /// A progress line with the step and the loss (on terminals only).
    pub progress: bool,
}

impl Default for DistillConfig {
    /// 100 steps at learning rate 1e-4, constant, the factors only: a short recovery after a
    /// good fit.
    fn default() -> Self {
        Self {
            steps: 100,
            learning_rate: 1e-4,
            schedule: Schedule::Constant,
            trained: Trained::Factors,
            progress: true,
        }
    }
}

/// What [`distill`] did: the loss of every step, and the time it took.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DistillLog {
    /// The mean squared error of each step's batch, before that step's update.
    pub losses: Vec<f64>,
    /// Wall time of the training.
    pub time: Duration,
}

impl DistillLog {
    /// The mean loss of the first `steps` steps (fewer if there were fewer).
    pub fn first(&self, steps: usize) -> f64 {
        self.mean(0..steps.min(self.losses.len()))
    }

    /// The mean loss of the last `steps` steps (fewer if there were fewer).
    pub fn last(&self, steps: usize) -> f64 {
        let n = self.losses.len();
        self.mean(n - steps.min(n)..n)
    }

    fn mean(&self, range: Range<usize>) -> f64 {
        let len = range.len().max(1) as f64;
        self.losses[range].iter().sum::<f64>() / len
    }
}

/// Trains `model` (a factorized variant) to reproduce, on each batch's input, the dense model's
/// output stored beside it: `forward(model, input, grads)` runs the model on the input traced
/// into `grads`. `model` is only changed when training succeeds; on an error it is as it was.
///
/// Errors (naming the layer `<model>`): no batch, a learning rate that is not positive, a
/// warm-up not shorter than the training, no factorized layer when training
/// [`Trained::Factors`], a non-finite loss (the learning rate is too high), or a device error.
pub fn distill<M, B, S, E, D, F>(
    model: &mut M,
    batches: &[(B, Tensor<S, E, D>)],
    cfg: &DistillConfig,
    mut forward: F,
) -> Result<DistillLog, FactorizeError>
where
    E: Dtype,
    D: Device<E>,
    S: Shape,
    M: TensorCollection<E, D> + VisitFactorized + Clone,
    F: FnMut(&M, &B, Gradients<E, D>) -> Result<Tensor<S, E, D, OwnedTape<E, D>>, D::Err>,
{
    check(cfg, batches.len())?;
    // Cloning shares the tensors' buffers; the optimizer's first write to each copies it, so
    // `model` keeps its weights until the end.
    let mut trained = model.clone();
    let ids = trained_ids(&mut trained, cfg.trained)?;
    let start = Instant::now();
    let progress = Steps::new(cfg.progress, cfg.steps);
    let adam = AdamConfig {
        lr: cfg.learning_rate,
        ..Default::default()
    };
    let mut opt = Adam::new(&trained, adam);
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        opt.cfg.lr = cfg.schedule.rate(cfg.learning_rate, step, cfg.steps);
        let (input, target) = &batches[step % batches.len()];
        // Backward keeps the gradients of these tensors only; the optimizer leaves the others.
        let mut grads = Gradients::leaky();
        grads.retain_leafs(&ids);
        let output = forward(&trained, input, grads).map_err(device::<E, D>)?;
        let (loss, value) = mean_squared_error(output, target).map_err(device::<E, D>)?;
        if !value.is_finite() {
            let lr = cfg.learning_rate;
            let reason =
                format!("the loss is {value} at step {step}: lower the learning rate (now {lr})");
            return Err(parameter("learning_rate", reason));
        }
        losses.push(value);
        progress.step(step, value);
        let grads = loss.try_backward().map_err(device::<E, D>)?;
        match opt.update(&mut trained, &grads) {
            // Tensors without a gradient (the ones not trained, or not on the output's path)
            // are left as they are.
            Ok(()) | Err(OptimizerUpdateError::UnusedParams(_)) => {}
            Err(OptimizerUpdateError::DeviceError(e)) => return Err(device::<E, D>(e)),
        }
    }
    *model = trained;
    Ok(DistillLog {
        losses,
        time: start.elapsed(),
    })
}

/// What [`distill`]'s errors name as the layer: the whole model.
const MODEL: &str = "<model>";

fn parameter(parameter: &'static str, reason: String) -> FactorizeError {
    FactorizeError::Parameter {
        layer: MODEL.into(),
        parameter,
        reason,
    }
}

fn device<E: Dtype, D: Device<E>>(e: D::Err) -> FactorizeError {
    FactorizeError::Device {
        layer: MODEL.into(),
        reason: format!("{e:?}"),
    }
}

/// The configuration errors [`distill`] finds before it trains.
fn check(cfg: &DistillConfig, batches: usize) -> Result<(), FactorizeError> {
    if batches == 0 {
        return Err(parameter("batches", "no batch to train on".into()));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
        let reason = format!("must be positive and finite, not {}", cfg.learning_rate);
        return Err(parameter("learning_rate", reason));
    }
    match cfg.schedule {
        Schedule::Cosine { warmup } if warmup >= cfg.steps.max(1) => {
            let reason = format!("a warm-up of {warmup} steps leaves none of {}", cfg.steps);
            Err(parameter("schedule", reason))
        }
        _ => Ok(()),
    }
}

/// The ids of the tensors [`distill`] trains in `model`.
fn trained_ids<E, D, M>(model: &mut M, trained: Trained) -> Result<Vec<UniqueId>, FactorizeError>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D> + VisitFactorized + Clone,
{
    if trained == Trained::All {
        return Ok(tensor_ids(model));
    }
    let mut ids = Vec::new();
    model.visit_factorized("", &mut |_, layer| {
        ids.extend(layer.parameter_ids());
        Ok(())
    })?;
    if ids.is_empty() {
        let reason = "the model has no factorized layer to train".into();
        return Err(parameter("trained", reason));
    }
    Ok(ids)
}

/// A traced scalar: a loss to call backward on.
type Loss<E, D> = Tensor<Rank0, E, D, OwnedTape<E, D>>;

/// The mean squared error of `output` against `target`, on the output's tape, and its value.
fn mean_squared_error<S: Shape, E: Dtype, D: Device<E>>(
    output: Tensor<S, E, D, OwnedTape<E, D>>,
    target: &Tensor<S, E, D>,
) -> Result<(Loss<E, D>, f64), D::Err> {
    let loss = output.try_sub(target.clone())?.try_square()?.try_mean()?;
    let value = (loss.retaped::<NoneTape>().as_vec().first())
        .and_then(|v| v.to_f64())
        .unwrap_or(f64::NAN);
    Ok((loss, value))
}

/// The ids of `module`'s tensors. dfdx keeps a tensor's id to itself, but its optimizers
/// report the ids of the tensors they found no gradient for: an update with none reports all.
pub(crate) fn tensor_ids<E, D, M>(module: &M) -> Vec<UniqueId>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D> + Clone,
{
    // Clones share their tensors' ids; an update without gradients changes nothing.
    let mut probe = module.clone();
    let mut sgd = Sgd::new(&probe, SgdConfig::default());
    match sgd.update(&mut probe, &Gradients::leaky()) {
        Err(OptimizerUpdateError::UnusedParams(unused)) => unused.ids,
        Ok(()) | Err(OptimizerUpdateError::DeviceError(_)) => Vec::new(),
    }
}
