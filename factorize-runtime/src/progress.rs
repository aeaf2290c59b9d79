//! Progress lines (indicatif), on terminals only: one per layer while a model is factorized,
//! a bar of steps while it is distilled.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::FactorizeConfig;

/// A bar, if shown, cleared when dropped.
struct Shown(Option<ProgressBar>);

impl Drop for Shown {
    fn drop(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

/// Shows "factorizing `path` (what)" with a spinner until dropped.
pub(crate) struct Layer {
    _bar: Shown,
}

impl Layer {
    pub(crate) fn start(cfg: &FactorizeConfig, path: &str, what: &str) -> Self {
        Self::doing(cfg, "factorizing", path, what)
    }

    /// As [`Self::start`], saying `verb` instead of "factorizing".
    pub(crate) fn doing(cfg: &FactorizeConfig, verb: &str, path: &str, what: &str) -> Self {
        if !cfg.progress {
            return Self { _bar: Shown(None) };
        }
        // `new_spinner` draws to stderr and hides itself when stderr is not a terminal.
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(format!("{verb} `{path}` ({what})"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Self {
            _bar: Shown(Some(bar)),
        }
    }
}

/// "distilling [bar] k/n loss x" while a model is distilled ([`crate::distill`]), until
/// dropped; hidden when `show` is false or stderr is not a terminal.
pub(crate) struct Steps {
    bar: Shown,
}

impl Steps {
    pub(crate) fn new(show: bool, total: usize) -> Self {
        let bar = show.then(|| {
            // Draws to stderr and hides itself when stderr is not a terminal.
            let bar = ProgressBar::new(total as u64);
            if let Ok(style) = ProgressStyle::with_template("distilling {bar:30} {pos}/{len} {msg}")
            {
                bar.set_style(style);
            }
            bar
        });
        Self { bar: Shown(bar) }
    }

    /// Step `step` (from 0) is done, with this loss.
    pub(crate) fn step(&self, step: usize, loss: f64) {
        if let Some(bar) = &self.bar.0 {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!("loss {loss:.4e}"));
        }
    }
}
