//! Collects every error, so that the user sees all bad attributes at once.
//!
//! As serde's `Ctxt`: a context must end in [`Ctxt::check`]; one dropped unchecked is a bug in
//! this crate (its errors would be lost), and panics in the macro instead of compiling code
//! that the checks rejected.

use std::fmt::Display;
use std::thread;

use quote::ToTokens;

#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
    checked: bool,
}

impl Ctxt {
    pub fn error_spanned_by<T: ToTokens, M: Display>(&mut self, tokens: T, message: M) {
        self.errors.push(syn::Error::new_spanned(tokens, message));
    }

    pub fn syn_error(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// All errors combined into one, or `Ok` when there were none.
    pub fn check(mut self) -> syn::Result<()> {
        self.checked = true;
        let mut errors = std::mem::take(&mut self.errors).into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for e in errors {
            combined.combine(e);
        }
        Err(combined)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        if !self.checked && !thread::panicking() {
            panic!("factorize-derive: an error context was dropped without being checked");
        }
    }
}
