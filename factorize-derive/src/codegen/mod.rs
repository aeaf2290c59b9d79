//! Code generation, split by what it emits.

pub mod collection;
mod factorize;
pub mod mirror;
pub mod sequential;
mod types;
mod variant;
mod visits;

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

use crate::internals::ast::Container;

/// The name of the factorized variant: `Mlp` → `MlpFactorized`.
pub fn variant_ident(ident: &Ident) -> Ident {
    format_ident!("{}Factorized", ident)
}

/// The hidden const holding the struct's parameters.
fn params_ident(ident: &Ident) -> Ident {
    format_ident!("__FACTORIZE_PARAMS_{}", ident)
}

pub fn expand(cont: &Container<'_>) -> TokenStream {
    let params = params_ident(&cont.input.ident);
    let params_value = cont.attrs.params_tokens();
    let variant = variant::expand(cont);
    let collection = collection::expand(cont, &variant_ident(&cont.input.ident));
    let factorize = factorize::expand(cont);
    let visits = visits::expand(cont);
    let checks = types::literal_rank_checks(cont);
    quote! {
        #checks
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        const #params: ::factorize_runtime::__private::FactorizeParams = #params_value;
        #variant
        #collection
        #factorize
        #visits
    }
}
