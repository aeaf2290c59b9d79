//! Sensitivity: what each layer, or each group of layers, does to the model's output when it
//! alone is factorized, at each rank of a grid. These are the damages that ranks are then
//! allocated by, to a budget ([`Sensitivity::plan`], the exact knapsack of [`crate::budget`]).
//!
//! Layer-local error is a poor guide to what a network loses: a layer whose own output error is
//! small may feed one that amplifies it. So the damage is measured where the user cares, at the
//! model's output, through a closure (with [`damage::mse`] and [`damage::cosine`] provided).
//!
//! Damages measured one layer at a time are then added, which underrates layers whose errors
//! compound: an attention block's query and key meet in one product. [`Grouping`] measures such
//! layers together, truncated at one rank, and plans give the group that one rank;
//! [`Truncation::Sequential`] fits them at each rank as the plan will be fitted.
//!
//! How ([`crate::Factorizable::sensitivity`]): the variant runs as the dense model (every
//! factorized layer stood in for by its dense layer, see [`crate::calibrate::StandIn`]) to give
//! the reference output. Then, group by group, one decomposition per layer gives the best pair
//! of every rank as a prefix ([`directions`]), and the group's layers stand in truncated to each
//! rank of its grid while all others stay dense. The cost is forward passes, `1 + Σ (layers +
//! ranks)` over the groups, and one eigen-decomposition per layer. `Sequential` instead fits
//! each layer afresh at each rank, after a forward that records its inputs.
//!
//! ```
//! use factorize_runtime::sensitivity::RankGrid;
//! use factorize_runtime::{cost::LayerShape, LayerKind};
//! let grid = RankGrid::Fractions { fractions: vec![0.25, 0.5, 0.75], multiple: 32 };
//! // 384 → 384 breaks even at rank 192: a quarter, a half and three quarters of its cost.
//! let ranks = grid.ranks(&[LayerShape::new(LayerKind::Linear, 384, 384, 1)]);
//! assert_eq!(ranks, [64, 96, 160]);
//! ```

use std::fmt;

use crate::budget::{allocate, Choice};
use crate::calibrate::{
    dense_stand_ins, dense_weights, forward_order, inputs_of, missing_dense, DenseWeights,
    RecordedInput, Refit, StandIn, VisitDense, VisitFactorized,
};
use crate::config::{FactorizeConfig, Fit, Method};
use crate::cost::LayerShape;
use crate::engine::calibrated::{self, directions, Calibration};
use crate::engine::{self, WeightMatrix};
use crate::error::FactorizeError;
use crate::stand_in::{StandIns, Standing};

/// The ranks each layer is measured at, rounded to a multiple: GEMM kernels run whole tiles, so
/// a rank of 100 costs about what 112 does.
#[derive(Debug, Clone, PartialEq)]
pub enum RankGrid {
    /// For each fraction `f` in `(0, 1)` of the layer's dense multiply-adds, the rank whose pair
    /// costs `f` of it, rounded to the nearest `multiple` (at least one).
    Fractions {
        /// Fractions of the dense layer's multiply-adds.
        fractions: Vec<f64>,
        /// The multiple ranks are rounded to (at least 1).
        multiple: usize,
    },
    /// Every multiple of `multiple` that saves multiply-adds: the finest grid for that multiple,
    /// and one that holds the same ranks for every layer (so one-rank baselines are on it).
    Multiples {
        /// The step (at least 1).
        multiple: usize,
    },
}

impl RankGrid {
    /// The default fractions: 1/16 to 7/8 of the dense cost, finer where the budgets of interest
    /// (a quarter to a half) fall.
    pub const FRACTIONS: [f64; 9] = [0.0625, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875];
    /// The default multiple: 16, a SIMD width and a GEMM tile edge on the CPU and the GPU.
    pub const MULTIPLE: usize = 16;

    /// The ranks at which a group of layers of `shapes`, all at one rank, saves multiply-adds
    /// on every layer, rising, without repeats; for one layer, pass one shape. A fraction of a
    /// group is of the group's summed per-position cost.
    pub fn ranks(&self, shapes: &[LayerShape]) -> Vec<usize> {
        let top = shapes.iter().map(LayerShape::max_rank).min().unwrap_or(0);
        let mut ranks: Vec<usize> = match self {
            RankGrid::Fractions {
                fractions,
                multiple,
            } => {
                let multiple = (*multiple).max(1);
                let per_rank: usize = shapes.iter().map(|s| s.fan_in() + s.out_dim).sum();
                let dense: usize = shapes.iter().map(LayerShape::dense_macs).sum();
                fractions
                    .iter()
                    .filter(|f| f.is_finite() && **f > 0.0)
                    .map(|f| {
                        let exact = f * dense as f64 / per_rank.max(1) as f64;
                        ((exact / multiple as f64).round() as usize).max(1) * multiple
                    })
                    .collect()
            }
            RankGrid::Multiples { multiple } => {
                let multiple = (*multiple).max(1);
                (1..=top / multiple).map(|k| k * multiple).collect()
            }
        };
        ranks.retain(|&r| r <= top);
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }
}

impl Default for RankGrid {
    fn default() -> Self {
        RankGrid::Fractions {
            fractions: Self::FRACTIONS.to_vec(),
            multiple: Self::MULTIPLE,
        }
    }
}

/// How a layer is truncated to a rank while its sensitivity is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Truncation {
    /// The truncated SVD of the weight ([`Method::Svd`]).
    Weight,
    /// The exact data-aware fit on the inputs the layer sees in the dense model
    /// ([`Fit::Exact`]; what [`Fit::Correcting`] gives a layer with nothing upstream changed).
    Data {
        /// Relative ridge, as [`Fit::Exact`]'s.
        ridge: f64,
    },
    /// At each rank, the group's layers fitted by `fit` in forward order, each on the inputs it
    /// sees with the group's earlier layers already fitted, as [`simulate`](
    /// crate::Factorizable::simulate) fits a plan: the damage of the fit the plan will get,
    /// including the errors that compound inside the group. A fit per layer and rank (and a
    /// forward to record its inputs) instead of one decomposition per layer; for a layer alone
    /// with [`Fit::Exact`] it measures what `Data` does. Prefer [`Fit::Exact`] here even for
    /// plans filled by [`Fit::Correcting`]: correction repairs a group cut alone (all else
    /// dense) better than it will in the whole plan, so its damages lead the knapsack to cut
    /// too deep.
    Sequential(Fit),
}

impl Default for Truncation {
    fn default() -> Self {
        Truncation::Data {
            ridge: Fit::DEFAULT_RIDGE,
        }
    }
}

/// Which layers are measured together, truncated at one rank, and given one rank by a plan.
#[derive(Debug, Clone, Copy, Default)]
pub enum Grouping {
    /// Each layer alone.
    #[default]
    Layers,
    /// The layers of one parent module: those whose paths are equal but for the last segment
    /// (e.g. an attention block's query, key, value and output projections).
    Parent,
    /// The layers the function maps to the same name.
    By(fn(&str) -> String),
}

impl Grouping {
    /// The name of the group of the layer at `path`.
    pub fn name(&self, path: &str) -> String {
        match self {
            Grouping::Layers => path.to_string(),
            Grouping::Parent => path.rsplit_once('.').map_or(path, |(p, _)| p).to_string(),
            Grouping::By(f) => f(path),
        }
    }

    /// `paths` (by index) in groups, each in the order of its first member, members in order.
    fn groups<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> Vec<(String, Vec<usize>)> {
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, path) in paths.into_iter().enumerate() {
            let name = self.name(path);
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, members)) => members.push(i),
                None => groups.push((name, vec![i])),
            }
        }
        groups
    }
}

/// What [`crate::Factorizable::sensitivity`] measures: at which ranks, how each layer is
/// truncated, and which layers together.
#[derive(Debug, Clone, Default)]
pub struct SensitivityParams {
    /// The ranks measured (default: [`RankGrid::FRACTIONS`] in multiples of
    /// [`RankGrid::MULTIPLE`]).
    pub grid: RankGrid,
    /// How a layer is cut to a rank (default: the exact data-aware fit).
    pub truncation: Truncation,
    /// Which layers share a rank (default: each layer alone).
    pub grouping: Grouping,
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Multiply-adds of one calibration run: per-position cost × positions the layer saw.
    Macs,
    /// Parameters.
    Params,
}

/// A measured layer: what it is and what it costs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Layer {
    /// The layer's path in the model.
    pub path: String,
    /// Its dims.
    pub shape: LayerShape,
    /// Output positions (rows) it computed in one calibration run.
    pub positions: usize,
}

impl Layer {
    /// The layer's cost dense (`None`) or as a pair of rank `rank`.
    pub fn cost(&self, rank: Option<usize>, cost: Cost) -> u64 {
        let s = &self.shape;
        let per = match (cost, rank) {
            (Cost::Macs, None) => s.dense_macs() * self.positions,
            (Cost::Macs, Some(r)) => s.factorized_macs(r) * self.positions,
            (Cost::Params, None) => s.dense_params(),
            (Cost::Params, Some(r)) => s.factorized_params(r),
        };
        per as u64
    }
}

/// One group's measurements: its layers truncated together at each rank.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Group {
    /// The group's name ([`Grouping::name`]; a layer alone is named by its path).
    pub name: String,
    /// Its layers, in field order.
    pub layers: Vec<Layer>,
    /// The ranks measured, rising.
    pub ranks: Vec<usize>,
    /// The damage at each rank, as the closure measured it.
    pub damage: Vec<f64>,
}

impl Group {
    /// The group's cost with every layer dense (`None`) or a pair of rank `rank`.
    pub fn cost(&self, rank: Option<usize>, cost: Cost) -> u64 {
        self.layers.iter().map(|l| l.cost(rank, cost)).sum()
    }

    /// Its options for [`allocate`]: dense (no damage) first, then each rank.
    pub fn choices(&self, cost: Cost) -> Vec<Choice> {
        std::iter::once(Choice::new(self.cost(None, cost), 0.0))
            .chain(
                self.ranks
                    .iter()
                    .zip(&self.damage)
                    .map(|(&r, &d)| Choice::new(self.cost(Some(r), cost), d.max(0.0))),
            )
            .collect()
    }
}

/// Every measured group, in the order of its first layer.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Sensitivity {
    /// One entry per group with a layer the forward reached.
    pub groups: Vec<Group>,
}

/// Ranks for every measured layer (`None`: kept dense), with what they cost and lose.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RankPlan {
    /// Path and rank of each layer, group by group.
    pub layers: Vec<(String, Option<usize>)>,
    /// The plan's cost.
    pub cost: u64,
    /// The cost with every layer dense.
    pub dense_cost: u64,
    /// The sum of the measured damages of its choices.
    pub damage: f64,
}

impl RankPlan {
    /// The rank of the layer at `path`: `Some(None)` when it stays dense, `None` when the plan
    /// does not have it.
    pub fn rank(&self, path: &str) -> Option<Option<usize>> {
        self.layers.iter().find(|(p, _)| p == path).map(|(_, r)| *r)
    }

    /// The plan as a ranks file, `path = rank` or `path = dense` per line: what
    /// `#[factorize(ranks = "file")]` reads at compile time to freeze it into the types.
    pub fn ranks_file(&self) -> String {
        let mut out = format!(
            "# {} of {} ({:.1}%), measured damage {:.4e}\n",
            self.cost,
            self.dense_cost,
            100.0 * self.cost as f64 / self.dense_cost.max(1) as f64,
            self.damage
        );
        for (path, rank) in &self.layers {
            match rank {
                Some(r) => out.push_str(&format!("{path} = {r}\n")),
                None => out.push_str(&format!("{path} = dense\n")),
            }
        }
        out
    }
}

impl fmt::Display for RankPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cost {} of {} ({:.1}%), damage {:.4e}",
            self.cost,
            self.dense_cost,
            100.0 * self.cost as f64 / self.dense_cost.max(1) as f64,
            self.damage
        )?;
        for (path, rank) in &self.layers {
            match rank {
                Some(r) => writeln!(f, "{path}: {r}")?,
                None => writeln!(f, "{path}: dense")?,
            }
        }
        Ok(())
    }
}

impl Sensitivity {
    /// Every measured layer, group by group.
    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.groups.iter().flat_map(|g| &g.layers)
    }

    /// The cost with every layer dense.
    pub fn dense_cost(&self, cost: Cost) -> u64 {
        self.groups.iter().map(|g| g.cost(None, cost)).sum()
    }

    /// The ranks of least total damage whose cost is at most `budget` (exactly, over the grid:
    /// see [`allocate`]), one per group; `None` when even the smallest ranks exceed it.
    pub fn plan(&self, cost: Cost, budget: u64) -> Option<RankPlan> {
        let choices: Vec<Vec<Choice>> = self.groups.iter().map(|g| g.choices(cost)).collect();
        let picked = allocate(&choices, budget)?;
        let ranks = (self.groups.iter().zip(&picked.choices))
            .map(|(g, &c)| c.checked_sub(1).map(|i| g.ranks[i]));
        Some(self.with_ranks(ranks, cost, picked.damage))
    }

    /// Every layer at `rank` (dense where `rank` saves nothing, as the cost rule keeps it), for
    /// comparison; `None` when a group that `rank` would pay on was not measured at it.
    pub fn uniform(&self, rank: usize, cost: Cost) -> Option<RankPlan> {
        let mut damage = 0.0;
        let mut ranks = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            if g.layers.iter().all(|l| rank > l.shape.max_rank()) {
                ranks.push(None);
            } else {
                let i = g.ranks.iter().position(|&r| r == rank)?;
                damage += g.damage[i].max(0.0);
                ranks.push(Some(rank));
            }
        }
        Some(self.with_ranks(ranks, cost, damage))
    }

    /// The plan that gives each group its rank of `ranks`.
    fn with_ranks(
        &self,
        ranks: impl IntoIterator<Item = Option<usize>>,
        cost: Cost,
        damage: f64,
    ) -> RankPlan {
        let mut plan = RankPlan {
            layers: Vec::new(),
            cost: 0,
            dense_cost: self.dense_cost(cost),
            damage,
        };
        for (g, rank) in self.groups.iter().zip(ranks) {
            plan.cost += g.cost(rank, cost);
            (plan.layers).extend(g.layers.iter().map(|l| (l.path.clone(), rank)));
        }
        plan
    }
}

/// Damage measures for [`crate::Factorizable::sensitivity`]'s closure, on outputs flattened
/// row-major.
pub mod damage {
    /// The mean squared difference.
    pub fn mse<T: Copy + Into<f64>>(reference: &[T], output: &[T]) -> f64 {
        let n = reference.len().max(1) as f64;
        reference
            .iter()
            .zip(output)
            .map(|(&a, &b)| (a.into() - b.into()).powi(2))
            .sum::<f64>()
            / n
    }

    /// The mean over rows of `width` of `1 − cos` between the reference row and the output row
    /// (0 when the directions agree; a zero row counts as orthogonal to anything non-zero).
    pub fn cosine<T: Copy + Into<f64>>(reference: &[T], output: &[T], width: usize) -> f64 {
        let width = width.max(1);
        let rows = reference.len() / width;
        let mut total = 0.0;
        for (a, b) in reference
            .chunks_exact(width)
            .zip(output.chunks_exact(width))
        {
            let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
            for (&x, &y) in a.iter().zip(b) {
                let (x, y): (f64, f64) = (x.into(), y.into());
                ab += x * y;
                aa += x * x;
                bb += y * y;
            }
            let cos = match (aa > 0.0, bb > 0.0) {
                (true, true) => ab / (aa.sqrt() * bb.sqrt()),
                (false, false) => 1.0,
                _ => 0.0,
            };
            total += 1.0 - cos;
        }
        total / rows.max(1) as f64
    }
}

/// `layer` (dense weights `(w, b)`) truncated to each of `ranks` from one decomposition, as
/// stand-ins, and the positions its recorded `inputs` hold: by weight SVD (`ridge` `None`) or
/// the exact data-aware fit with that ridge.
fn truncations(
    path: &str,
    layer: &mut dyn Refit,
    (w, b): (&[f64], &[f64]),
    inputs: &[RecordedInput],
    ranks: &[usize],
    ridge: Option<f64>,
) -> Result<(Vec<StandIn>, usize), FactorizeError> {
    let shape = layer.shape();
    let rows = layer.rows(path, inputs)?;
    let positions = rows.len() / shape.fan_in().max(1);
    let Some(&max) = ranks.last() else {
        return Ok((Vec::new(), positions));
    };
    let wm = WeightMatrix::new(path, w, shape.out_dim, shape.fan_in())?;
    let family = match ridge {
        None => directions(&wm, b, None, 0.0, max)?,
        Some(ridge) => {
            let x = Calibration::of_rows(path, &rows, shape.fan_in(), None)?;
            directions(&wm, b, Some(&x), ridge, max)?
        }
    };
    let stand_ins = ranks
        .iter()
        .map(|&r| {
            let (wr, br) = family.truncated(r);
            layer.stand_in(path, (&wr, &br))
        })
        .collect::<Result<_, _>>()?;
    Ok((stand_ins, positions))
}

/// `f` on the layer of `model` at `address`, with its path.
fn with_layer<T: VisitFactorized>(
    model: &mut T,
    address: usize,
    mut f: impl FnMut(&str, &mut dyn Refit) -> Result<(), FactorizeError>,
) -> Result<(), FactorizeError> {
    model.visit_factorized("", &mut |path, layer| {
        if layer.address() == address {
            f(path, layer)?;
        }
        Ok(())
    })
}

/// A factorized layer of the variant: its path, its address (what stand-ins are keyed by) and
/// its shape.
struct Site {
    path: String,
    address: usize,
    shape: LayerShape,
}

/// Per layer address, its stand-in at each rank of its group.
type Prefixes = Vec<(usize, Vec<StandIn>)>;

/// The variant running as the dense model: what sensitivity and simulation start from.
struct AsDense<T> {
    /// Boxed: stand-ins are keyed by layer address, so the layers must not move.
    model: Box<T>,
    /// The dense weights by path.
    weights: DenseWeights,
    /// Every factorized layer stood in for by its dense layer.
    stand_ins: StandIns,
}

/// How sensitivity and simulation have the variant built from `cfg`: by a fresh init, with no
/// progress lines. Its own weights are never used (every run stands its layers in), and a
/// fresh init costs no decomposition.
pub(crate) fn fresh(cfg: &FactorizeConfig) -> FactorizeConfig {
    FactorizeConfig {
        method: Method::Fresh,
        progress: false,
        ..*cfg
    }
}

impl<T: VisitFactorized> AsDense<T> {
    /// `variant` (built as [`fresh`] says) running as `dense`.
    fn new<M: VisitDense>(dense: &M, variant: T) -> Result<Self, FactorizeError> {
        let mut model = Box::new(variant);
        let weights = dense_weights(dense);
        let stand_ins = dense_stand_ins(&mut *model, &weights)?;
        Ok(Self {
            model,
            weights,
            stand_ins,
        })
    }

    /// Path, address and shape of every factorized layer, in field order.
    fn layers(&mut self) -> Result<Vec<Site>, FactorizeError> {
        let mut layers = Vec::new();
        self.model.visit_factorized("", &mut |path, layer| {
            layers.push(Site {
                path: path.to_string(),
                address: layer.address(),
                shape: layer.shape(),
            });
            Ok(())
        })?;
        Ok(layers)
    }

    /// `sites` with the inputs each sees in the dense model; the forward does not reach the
    /// ones left out, so they have nothing to measure and nothing to save.
    fn reached<'s, R>(
        &self,
        sites: &[&'s Site],
        run: &mut impl FnMut(&T) -> R,
    ) -> Vec<(&'s Site, Vec<RecordedInput>)> {
        (sites.iter())
            .map(|&site| {
                let inputs = inputs_of(&*self.model, site.address, &self.stand_ins, run);
                (site, inputs)
            })
            .filter(|(_, inputs)| !inputs.is_empty())
            .collect()
    }

    /// The measured `layers` (path, address and shape, with their recorded dense inputs), and
    /// per layer its stand-in at each of `ranks` from one decomposition (none for
    /// [`Truncation::Sequential`], which fits each rank afresh).
    fn prefixes(
        &mut self,
        layers: &[(&Site, Vec<RecordedInput>)],
        ranks: &[usize],
        truncation: Truncation,
    ) -> Result<(Vec<Layer>, Prefixes), FactorizeError> {
        let ridge = match truncation {
            Truncation::Weight => Some(None),
            Truncation::Data { ridge } => Some(Some(ridge)),
            Truncation::Sequential(_) => None,
        };
        let mut measured = Vec::with_capacity(layers.len());
        let mut prefixes = Vec::with_capacity(layers.len());
        for (
            Site {
                path,
                address,
                shape,
            },
            inputs,
        ) in layers
        {
            let (w, b) = self.weights.get(path).ok_or_else(|| missing_dense(path))?;
            let mut positions = 0;
            with_layer(&mut *self.model, *address, |p, layer| {
                if let Some(ridge) = ridge {
                    let (stand_ins, n) = truncations(p, layer, (w, b), inputs, ranks, ridge)?;
                    prefixes.push((*address, stand_ins));
                    positions = n;
                } else {
                    positions = layer.rows(p, inputs)?.len() / shape.fan_in().max(1);
                }
                Ok(())
            })?;
            measured.push(Layer {
                path: path.clone(),
                shape: *shape,
                positions,
            });
        }
        Ok((measured, prefixes))
    }

    /// The stand-ins that make the layers of `planned` (path, address and rank, in forward
    /// order) the dense products of their pairs, fitted one after the other as `fit` says on
    /// the inputs each sees with those before it already fitted, or by weight SVD (`None`).
    fn fitted_in_order<R>(
        &mut self,
        planned: &[(&str, usize, usize)],
        fit: Option<Fit>,
        cfg: &FactorizeConfig,
        run: &mut impl FnMut(&T) -> R,
    ) -> Result<StandIns, FactorizeError> {
        let mut current = self.stand_ins.clone();
        for &(path, address, rank) in planned {
            let inputs = match fit {
                Some(_) => inputs_of(&*self.model, address, &current, run),
                None => Vec::new(),
            };
            let reference = match fit {
                Some(Fit::Correcting { .. }) => {
                    Some(inputs_of(&*self.model, address, &self.stand_ins, run))
                }
                _ => None,
            };
            let (w, b) = self.weights.get(path).ok_or_else(|| missing_dense(path))?;
            let mut stand_in = None;
            with_layer(&mut *self.model, address, |p, layer| {
                let inputs = (inputs.as_slice(), reference.as_deref());
                stand_in = Some(fitted(p, layer, (w, b), inputs, rank, fit, cfg)?);
                Ok(())
            })?;
            if let Some(s) = stand_in {
                current.insert(address, s);
            }
        }
        Ok(current)
    }
}

/// The body of [`crate::Factorizable::sensitivity`].
/// `variant` is `dense`'s, built as [`fresh`] says.
pub(crate) fn measure<M, T, O, F, G>(
    dense: &M,
    variant: T,
    params: &SensitivityParams,
    cfg: &FactorizeConfig,
    mut run: F,
    mut damage: G,
) -> Result<Sensitivity, FactorizeError>
where
    M: VisitDense,
    T: VisitFactorized,
    F: FnMut(&T) -> O,
    G: FnMut(&O, &O) -> f64,
{
    let mut base = AsDense::new(dense, variant)?;
    let reference = {
        let _standing = Standing::start(&base.stand_ins);
        run(&base.model)
    };
    let layers = base.layers()?;
    let order = match params.truncation {
        Truncation::Sequential(_) => forward_order(&*base.model, &base.stand_ins, &mut run),
        _ => Vec::new(),
    };
    let groups = params
        .grouping
        .groups(layers.iter().map(|l| l.path.as_str()));
    let (mut measured, total) = (Sensitivity::default(), groups.len());
    for (k, (name, members)) in groups.into_iter().enumerate() {
        let _progress = crate::progress::Layer::doing(
            cfg,
            "measuring",
            &name,
            &format!("{} of {total}", k + 1),
        );
        let members: Vec<&Site> = members.iter().map(|&i| &layers[i]).collect();
        let reached = base.reached(&members, &mut run);
        if reached.is_empty() {
            continue;
        }
        let shapes: Vec<LayerShape> = reached.iter().map(|(site, _)| site.shape).collect();
        let ranks = params.grid.ranks(&shapes);
        let (group_layers, prefixes) = base.prefixes(&reached, &ranks, params.truncation)?;
        let mut group = Group {
            name,
            layers: group_layers,
            ranks,
            damage: Vec::new(),
        };
        for (r, &rank) in group.ranks.iter().enumerate() {
            let these = match params.truncation {
                Truncation::Sequential(fit) => {
                    let planned: Vec<(&str, usize, usize)> = (order.iter())
                        .filter_map(|a| reached.iter().find(|(site, _)| site.address == *a))
                        .map(|(site, _)| (site.path.as_str(), site.address, rank))
                        .collect();
                    base.fitted_in_order(&planned, Some(fit), cfg, &mut run)?
                }
                _ => {
                    let mut these = base.stand_ins.clone();
                    for (address, stand_ins) in &prefixes {
                        these.insert(*address, stand_ins[r].clone());
                    }
                    these
                }
            };
            let output = {
                let _standing = Standing::start(&these);
                run(&base.model)
            };
            group.damage.push(damage(&reference, &output));
        }
        measured.groups.push(group);
    }
    Ok(measured)
}

/// A [`RankPlan`] run without compiling it (see [`crate::Factorizable::simulate`]): the
/// variant with every planned layer stood in for by the dense product of its fitted pair.
pub struct Simulated<T> {
    /// Boxed: stand-ins are keyed by layer address, so the layers must not move.
    model: Box<T>,
    stand_ins: StandIns,
}

impl<T> Simulated<T> {
    /// `f` on the variant as the plan makes it, on the calling thread.
    pub fn run<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let _standing = Standing::start(&self.stand_ins);
        f(&self.model)
    }
}

impl<T> fmt::Debug for Simulated<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Simulated({} layers)", self.stand_ins.len())
    }
}

/// `layer` (dense weights `(w, b)`) as the dense product of its rank-`rank` pair, fitted on
/// its recorded `inputs` (and the dense model's, for a correcting fit) or by weight SVD.
fn fitted(
    path: &str,
    layer: &mut dyn Refit,
    (w, b): (&[f64], &[f64]),
    (inputs, reference): (&[RecordedInput], Option<&[RecordedInput]>),
    rank: usize,
    fit: Option<Fit>,
    cfg: &FactorizeConfig,
) -> Result<StandIn, FactorizeError> {
    let shape = layer.shape();
    let wm = WeightMatrix::new(path, w, shape.out_dim, shape.fan_in())?;
    let Some(kind) = fit else {
        return layer.stand_in(path, (&engine::solve(&wm, rank, cfg)?.value.product(), b));
    };
    let rows = layer.rows(path, inputs)?;
    let reference = reference.map(|r| layer.rows(path, r)).transpose()?;
    let x = Calibration::of_rows(path, &rows, shape.fan_in(), reference.as_deref())?;
    let solved = calibrated::solve(&wm, b, &x, rank, kind, cfg.backend)?.value;
    layer.stand_in(path, (&solved.factors.product(), &solved.bias))
}

/// The body of [`crate::Factorizable::simulate`].
/// `variant` is `dense`'s, built as [`fresh`] says.
pub(crate) fn simulate<M, T, F>(
    dense: &M,
    variant: T,
    plan: &RankPlan,
    fit: Option<Fit>,
    cfg: &FactorizeConfig,
    mut run: F,
) -> Result<Simulated<T>, FactorizeError>
where
    M: VisitDense,
    T: VisitFactorized,
    F: FnMut(&T),
{
    let mut base = AsDense::new(dense, variant)?;
    let layers = base.layers()?;
    for (path, _) in &plan.layers {
        if !layers.iter().any(|site| site.path == *path) {
            return Err(FactorizeError::Calibration {
                layer: path.clone(),
                reason: "the plan names a layer that the variant does not factorize".into(),
            });
        }
    }
    // Forward order, as calibration fits: each layer sees what the layers before it, as
    // already fitted, hand it.
    let order = forward_order(&*base.model, &base.stand_ins, &mut run);
    let planned: Vec<(&str, usize, usize)> = (order.iter())
        .filter_map(|a| layers.iter().find(|site| site.address == *a))
        .filter_map(|site| Some((site.path.as_str(), site.address, plan.rank(&site.path)??)))
        .collect();
    let stand_ins = base.fitted_in_order(&planned, fit, cfg, &mut run)?;
    Ok(Simulated {
        model: base.model,
        stand_ins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerKind;

    fn layer(path: &str) -> Layer {
        Layer {
            path: path.into(),
            shape: LayerShape::new(LayerKind::Linear, 256, 256, 1),
            positions: 10,
        }
    }

    fn alone(path: &str, ranks: Vec<usize>, damage: Vec<f64>) -> Group {
        Group {
            name: path.into(),
            layers: vec![layer(path)],
            ranks,
            damage,
        }
    }

    #[test]
    fn grid_ranks_are_rounded_saving_and_distinct() {
        let shape = LayerShape::new(LayerKind::Linear, 384, 1536, 1);
        let ranks = RankGrid::default().ranks(&[shape]);
        assert_eq!(ranks, [16, 32, 64, 80, 112, 160, 192, 224, 272]);
        assert!(ranks.iter().all(|r| r % 16 == 0 && *r <= shape.max_rank()));
        // Rounding never leaves the saving side, and tiny layers get at least one multiple.
        let tiny = LayerShape::new(LayerKind::Linear, 8, 8, 1);
        assert_eq!(RankGrid::default().ranks(&[tiny]), Vec::<usize>::new());
        let odd = RankGrid::Fractions {
            fractions: vec![0.99, f64::NAN, -1.0],
            multiple: 0,
        };
        assert_eq!(odd.ranks(&[shape]), [304]);
        let every = RankGrid::Multiples { multiple: 100 };
        assert_eq!(every.ranks(&[shape]), [100, 200, 300]);
        // A group: ranks that save on every layer, fractions of the summed cost.
        let square = LayerShape::new(LayerKind::Linear, 384, 384, 1);
        assert_eq!(every.ranks(&[shape, square]), [100]);
        assert_eq!(every.ranks(&[]), Vec::<usize>::new());
        let half = RankGrid::Fractions {
            fractions: vec![0.5],
            multiple: 1,
        };
        // (384·1536 + 384²) / 2 / (384 + 1536 + 384 + 384) = 137.1.
        assert_eq!(half.ranks(&[shape, square]), [137]);
    }

    #[test]
    fn groupings_name_and_gather_layers() {
        let paths = [
            "l.0.attn.q",
            "l.0.attn.k",
            "l.0.ffn.up",
            "head",
            "l.0.attn.v",
        ];
        let parent = Grouping::Parent.groups(paths);
        let names: Vec<_> = parent.iter().map(|(n, m)| (n.as_str(), &m[..])).collect();
        assert_eq!(
            names,
            [
                ("l.0.attn", &[0, 1, 4][..]),
                ("l.0.ffn", &[2]),
                ("head", &[3])
            ]
        );
        assert_eq!(Grouping::Layers.groups(paths).len(), 5);
        let one = Grouping::By(|_| "all".into()).groups(paths);
        assert_eq!(one, [("all".to_string(), vec![0, 1, 2, 3, 4])]);
    }

    #[test]
    fn plans_are_the_exact_allocation_and_uniform_plans_add_up() {
        let s = Sensitivity {
            groups: vec![
                alone("fc", vec![32, 64], vec![0.5, 0.1]),
                alone("fc2", vec![32, 64], vec![0.01, 0.0]),
            ],
        };
        let dense = s.dense_cost(Cost::Macs);
        assert_eq!(dense, 2 * 256 * 256 * 10);
        // Room for one layer at 64 and one at 32: the damaged layer gets 64.
        let budget = (64 + 32) * 512 * 10;
        let plan = s.plan(Cost::Macs, budget).unwrap();
        assert_eq!(
            plan.layers,
            [("fc".into(), Some(64)), ("fc2".into(), Some(32))]
        );
        assert_eq!((plan.cost, plan.damage), (budget, 0.11));
        assert_eq!(plan.rank("fc2"), Some(Some(32)));
        let file = plan.ranks_file();
        assert!(file.starts_with("# 491520 of 1310720 (37.5%)"), "{file}");
        assert!(file.ends_with("\nfc = 64\nfc2 = 32\n"), "{file}");
        let mut kept = plan.clone();
        kept.layers[1].1 = None;
        assert!(kept.ranks_file().ends_with("fc2 = dense\n"));
        let uniform = s.uniform(32, Cost::Macs).unwrap();
        assert_eq!((uniform.cost, uniform.damage), (64 * 512 * 10, 0.51));
        assert!(s.uniform(48, Cost::Macs).is_none());
        let above = s.uniform(200, Cost::Params).unwrap();
        assert_eq!((above.cost, above.layers[0].1), (dense_params(2), None));
        assert!(s.plan(Cost::Macs, 10).is_none());
    }

    #[test]
    fn a_group_takes_one_rank_and_costs_all_its_layers() {
        let s = Sensitivity {
            groups: vec![
                Group {
                    name: "block".into(),
                    layers: vec![layer("q"), layer("k")],
                    ranks: vec![32, 64],
                    damage: vec![0.4, 0.1],
                },
                alone("fc", vec![32, 64], vec![0.2, 0.05]),
            ],
        };
        assert_eq!(s.layers().count(), 3);
        // Block at 64 and fc at 32 lose 0.3; block at 32 and fc at 64 lose 0.45.
        let budget = (2 * 64 + 32) * 512 * 10;
        let plan = s.plan(Cost::Macs, budget).unwrap();
        assert_eq!(
            plan.layers,
            [
                ("q".into(), Some(64)),
                ("k".into(), Some(64)),
                ("fc".into(), Some(32))
            ]
        );
        assert_eq!((plan.cost, plan.damage), (budget, 0.1 + 0.2));
        let uniform = s.uniform(32, Cost::Macs).unwrap();
        assert_eq!(
            (uniform.cost, uniform.damage),
            (3 * 32 * 512 * 10, 0.4 + 0.2)
        );
        assert!(s.uniform(48, Cost::Macs).is_none());
        let above = s.uniform(200, Cost::Macs).unwrap();
        assert!(above.layers.iter().all(|(_, r)| r.is_none()));
        assert_eq!(above.cost, s.dense_cost(Cost::Macs));
    }

    fn dense_params(layers: u64) -> u64 {
        layers * (256 * 256 + 256)
    }

    #[test]
    fn damage_measures() {
        assert_eq!(damage::mse(&[1.0f32, 2.0], &[1.0, 4.0]), 2.0);
        let a = [1.0f64, 0.0, 0.0, 1.0];
        let b = [2.0f64, 0.0, 1.0, 0.0];
        assert!((damage::cosine(&a, &b, 2) - 0.5).abs() < 1e-12);
        assert_eq!(damage::cosine(&[0.0f64; 2], &[0.0; 2], 2), 0.0);
    }
}
