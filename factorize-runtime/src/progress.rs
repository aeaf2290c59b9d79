//! A progress line per layer while a model is factorized (indicatif), on terminals only.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::FactorizeConfig;

/// Shows "factorizing `path` (what)" with a spinner until dropped, then leaves a done line.
pub(crate) struct Layer {
    bar: Option<ProgressBar>,
}

impl Layer {
    pub(crate) fn start(cfg: &FactorizeConfig, path: &str, what: &str) -> Self {
        Self::doing(cfg, "factorizing", path, what)
    }

    /// As [`Self::start`], saying `verb` instead of "factorizing".
    pub(crate) fn doing(cfg: &FactorizeConfig, verb: &str, path: &str, what: &str) -> Self {
        if !cfg.progress {
            return Self { bar: None };
        }
        // `new_spinner` draws to stderr and hides itself when stderr is not a terminal.
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(format!("{verb} `{path}` ({what})"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Self { bar: Some(bar) }
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
