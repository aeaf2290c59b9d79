//! The command line, parsed into a [`Command`] before anything is loaded: every option is
//! checked here (a bad value, an option where it does nothing) so that a mistake costs a line,
//! not hours of fitting that ignored it.

use factorize_runtime::distill::Trained;

use crate::pipeline::{self, FitData, FitKind, Objective, Training};

pub const USAGE: &str =
    "usage: minilm [--rank R --fit svd|data|correcting | --macs 25|50] [--fit-copies COPIES] [--fit-corpus LINES] [--distill STEPS [--augment COPIES] [--corpus LINES] [--lr X] [--schedule constant|cosine] [--train factors|all] [--on hidden|layers|embeddings]] [embed <sentences.txt> <out.safetensors>]\n       minilm frontier [--sentences N] [--fit-copies COPIES] [--fit-corpus LINES] [--steps N] [--augment COPIES] [--corpus LINES] [--lr X] [--schedule constant|cosine] [--train factors|all] [--on hidden|layers|embeddings]\n       minilm planned\n       minilm recovery [--steps N] [--lr X] [--schedule constant|cosine] [--train factors|all] [--on hidden|layers|embeddings] [--augment COPIES] [--corpus LINES] [--macs 25|50]";

/// The ranks `--rank` takes: the table's, applied to all 36 `Linear`s.
pub const RANKS: [usize; 5] = [32, 64, 96, 128, 160];

/// The budgets (shares of the dense model's linear multiply-adds, in percent) that have
/// committed plans (`planned.rs`).
pub const PLANNED_MACS: [usize; 2] = [25, 50];

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// No arguments: every rank of the table under each fit, against the dense model.
    Table,
    /// `planned`: the committed plans, compiled, against the dense model.
    Planned,
    /// `frontier`: the whole route, fidelity against multiply-adds, with tables and figures.
    Frontier {
        /// Calibration sentences the sensitivity and the fits read (`--sentences`).
        sentences: usize,
        /// What the trained block plans' fits calibrate on beside them.
        fit: FitData,
        /// How the trained points train.
        training: Training,
    },
    /// `recovery`: distillation after factorizing, before and after, at each budget.
    Recovery {
        training: Training,
        /// Shares of the linear multiply-adds, in percent (`--macs`; both unless given).
        budgets: Vec<usize>,
    },
    /// `embed <sentences.txt> <out.safetensors>`, with the dense model or a variant.
    Embed {
        /// The dense model when `None`.
        variant: Option<Variant>,
        /// What the variant's data-aware fits calibrate on beside the calibration sentences.
        fit: FitData,
        /// Distillation after factorizing (none at 0 steps).
        training: Training,
        input: String,
        output: String,
    },
}

/// A variant to embed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// All 36 Linears at one rank, filled by a fit.
    Rank(usize, FitKind),
    /// The planned ranks (`planned.rs`) at this share of the linear multiply-adds.
    Planned(usize),
}

/// No training: what `embed` does unless `--distill` says.
const UNTRAINED: Training = Training {
    steps: 0,
    learning_rate: pipeline::DISTILL_LEARNING_RATE,
    copies: 0,
    corpus: 0,
    cosine: false,
    trained: Trained::Factors,
    objective: Objective::Hidden,
};

/// Steps `recovery` trains for unless `--steps` says.
const RECOVERY_STEPS: usize = 100;

/// The command `args` (the program's name left out) ask for, or a one-line reason (with the
/// usage where the shape of the line is wrong).
///
/// The options before a command are `embed`'s: they describe the variant it writes. The other
/// commands take theirs after their name, and an option before them is an error rather than
/// silently ignored.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut variant = VariantOptions::default();
    let (mut fit, mut training) = (FitData::default(), UNTRAINED);
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        match flag.as_str() {
            _ if variant.option(flag, value)? => {}
            _ if fit_option(&mut fit, flag, value)? => {}
            _ if training_option(&mut training, "--distill", flag, value)? => {}
            _ => break,
        }
        rest = tail;
    }
    // The options come first: the first argument names one when any was taken.
    let first = (rest.len() < args.len()).then(|| args[0].as_str());
    match (rest, first) {
        ([cmd, input, output], _) if cmd == "embed" => {
            let variant = variant.variant()?;
            let asks_a_variant = match (training.steps, fit.is_none()) {
                (0, true) => None,
                (0, false) => Some("--fit-copies and --fit-corpus calibrate a variant's fit"),
                _ => Some("--distill trains a variant"),
            };
            if let (Some(flag), None) = (asks_a_variant, variant) {
                return Err(format!("{flag}: add --rank and --fit, or --macs\n{USAGE}"));
            }
            let (input, output) = (input.clone(), output.clone());
            Ok(Command::Embed {
                variant,
                fit,
                training,
                input,
                output,
            })
        }
        ([], Some(flag)) => Err(format!(
            "{flag} describes the variant `embed <sentences.txt> <out.safetensors>` writes; the table takes no options"
        )),
        ([cmd, ..], Some(flag)) if is_command(cmd) => Err(format!(
            "{flag} goes after `{cmd}`, with that command's options\n{USAGE}"
        )),
        ([], None) => Ok(Command::Table),
        ([cmd], None) if cmd == "planned" => Ok(Command::Planned),
        ([cmd, ..], None) if cmd == "planned" => Err(format!("`{cmd}` takes no options\n{USAGE}")),
        ([cmd, options @ ..], None) if cmd == "frontier" => frontier(options),
        ([cmd, options @ ..], None) if cmd == "recovery" => recovery(options),
        ([flag], _) if is_option(flag) => Err(format!("{flag} needs a value\n{USAGE}")),
        ([flag, ..], _) if flag.starts_with('-') => {
            Err(format!("no option {flag} before a command\n{USAGE}"))
        }
        _ => Err(USAGE.into()),
    }
}

/// The options that choose `embed`'s variant, as given.
#[derive(Default)]
struct VariantOptions {
    rank: Option<usize>,
    fit: Option<FitKind>,
    macs: Option<usize>,
}

impl VariantOptions {
    /// Takes `flag` with `value` when it is `--rank`, `--fit` or `--macs`; false otherwise.
    fn option(&mut self, flag: &str, value: &str) -> Result<bool, String> {
        match flag {
            "--rank" => match count(flag, value)? {
                r if RANKS.contains(&r) => self.rank = Some(r),
                r => return Err(format!("--rank takes one of {RANKS:?}, not {r}")),
            },
            "--fit" => self.fit = Some(value.parse::<FitKind>()?),
            "--macs" => self.macs = Some(budget(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The variant they name: none, a rank with its fit, or a plan.
    fn variant(&self) -> Result<Option<Variant>, String> {
        match (self.rank, self.fit, self.macs) {
            (None, None, None) => Ok(None),
            (Some(r), Some(f), None) => Ok(Some(Variant::Rank(r, f))),
            (None, None, Some(m)) => Ok(Some(Variant::Planned(m))),
            _ => Err(format!(
                "--rank and --fit go together, --macs goes alone\n{USAGE}"
            )),
        }
    }
}

/// `frontier` with `options`: the measured recipe, changed where they say.
fn frontier(options: &[String]) -> Result<Command, String> {
    let mut sentences = pipeline::CALIBRATION.len();
    let (mut fit, mut training) = (FitData::MEASURED, Training::MEASURED);
    for pair in options.chunks(2) {
        match pair {
            [flag, n] if flag == "--sentences" => sentences = count(flag, n)?,
            [flag, v] if fit_option(&mut fit, flag, v)? => {}
            [flag, v] if training_option(&mut training, "--steps", flag, v)? => {}
            _ => return Err(unknown("frontier", pair)),
        }
    }
    Ok(Command::Frontier {
        sentences,
        fit,
        training,
    })
}

/// `recovery` with `options`: [`RECOVERY_STEPS`] steps at each budget unless they say.
fn recovery(options: &[String]) -> Result<Command, String> {
    let mut training = Training {
        steps: RECOVERY_STEPS,
        ..UNTRAINED
    };
    let mut budgets = PLANNED_MACS.to_vec();
    for pair in options.chunks(2) {
        match pair {
            [flag, v] if training_option(&mut training, "--steps", flag, v)? => {}
            [flag, m] if flag == "--macs" => budgets = vec![budget(m)?],
            _ => return Err(unknown("recovery", pair)),
        }
    }
    Ok(Command::Recovery { training, budgets })
}

/// Whether `flag` is an option before a command (tried on scratch values: a value it refuses
/// still names an option).
fn is_option(flag: &str) -> bool {
    let (mut fit, mut training) = (FitData::default(), UNTRAINED);
    VariantOptions::default().option(flag, "0").unwrap_or(true)
        || fit_option(&mut fit, flag, "0").unwrap_or(true)
        || training_option(&mut training, "--distill", flag, "0").unwrap_or(true)
}

/// Whether `word` names a command that takes its options after its name.
fn is_command(word: &str) -> bool {
    matches!(word, "planned" | "frontier" | "recovery")
}

/// The error for `pair`, an option `cmd` does not take (or one without its value).
fn unknown(cmd: &str, pair: &[String]) -> String {
    match pair {
        [flag] => format!("`{cmd}`: {flag} needs a value\n{USAGE}"),
        _ => format!("`{cmd}` takes no option {}\n{USAGE}", pair[0]),
    }
}

/// The integer value `n` of the option `flag`.
fn count(flag: &str, n: &str) -> Result<usize, String> {
    n.parse()
        .map_err(|_| format!("{flag} takes an integer, not `{n}`"))
}

/// The value of `--macs`: one of [`PLANNED_MACS`].
fn budget(m: &str) -> Result<usize, String> {
    match m.parse() {
        Ok(m) if PLANNED_MACS.contains(&m) => Ok(m),
        _ => Err(format!("--macs takes 25 or 50, not `{m}`")),
    }
}

/// Sets the option `flag` of `fit` to `value` when it is one of the fits' data options
/// (`--fit-copies`, `--fit-corpus`); false when it is neither.
fn fit_option(fit: &mut FitData, flag: &str, value: &str) -> Result<bool, String> {
    match flag {
        "--fit-copies" => fit.copies = count(flag, value)?,
        "--fit-corpus" => fit.corpus = count(flag, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Sets the option `flag` of `how` to `value` when it is one of the training options
/// (`steps`, the name the command gives the step count, `--augment`, `--corpus`, `--lr`,
/// `--schedule`, `--train`, `--on`); false when it is none of them.
fn training_option(
    how: &mut Training,
    steps: &str,
    flag: &str,
    value: &str,
) -> Result<bool, String> {
    match flag {
        _ if flag == steps => how.steps = count(flag, value)?,
        "--augment" => how.copies = count(flag, value)?,
        "--corpus" => how.corpus = count(flag, value)?,
        "--lr" => {
            let reason = || format!("--lr takes a number, not `{value}`");
            how.learning_rate = value.parse().map_err(|_| reason())?
        }
        "--schedule" => {
            how.cosine = match value {
                "cosine" => true,
                "constant" => false,
                _ => {
                    let reason = format!("--schedule takes `constant` or `cosine`, not `{value}`");
                    return Err(reason);
                }
            }
        }
        "--train" => {
            how.trained = match value {
                "factors" => Trained::Factors,
                "all" => Trained::All,
                _ => return Err(format!("--train takes `factors` or `all`, not `{value}`")),
            }
        }
        "--on" => how.objective = value.parse()?,
        _ => return Ok(false),
    }
    Ok(true)
}
