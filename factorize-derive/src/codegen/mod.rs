//! Code generation, split by what it emits.

pub mod carried;
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

/// `span`'s location with the derive's own hygiene: generated code names `self` and its own
/// locals, which a span from a `macro_rules!` expansion would hide (errors still point at
/// `span`).
pub fn at(span: proc_macro2::Span) -> proc_macro2::Span {
    proc_macro2::Span::call_site().located_at(span)
}

/// The runtime's support module for generated code (`factorize_runtime::__private`).
pub fn private() -> TokenStream {
    quote!(::factorize_runtime::__private)
}

/// The name of the factorized variant: `Mlp` → `MlpFactorized`.
pub fn variant_ident(ident: &Ident) -> Ident {
    format_ident!("{}Factorized", ident)
}

/// The hidden const holding the struct's parameters.
fn params_ident(ident: &Ident) -> Ident {
    format_ident!("__FACTORIZE_PARAMS_{}", ident)
}

/// What a failed derive emits beside its error, as thiserror does: a `Factorizable` impl whose
/// body never runs (the build has already failed), so that the user's `model.factorize(..)`
/// calls do not each add an error of their own to the one mistake.
pub fn fallback(input: &syn::DeriveInput) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let pv = private();
    quote! {
        impl #impl_generics #pv::Factorizable for #ident #ty_generics #where_clause {
            type Factorized = Self;
            fn factorize_into(
                &self,
                _: &str,
                _: &#pv::FactorizeConfig,
                _: &mut #pv::FactorizeReport,
            ) -> ::core::result::Result<Self, #pv::FactorizeError> {
                ::core::unreachable!("the derive reported an error, so this does not build")
            }
        }
    }
}

pub fn expand(cont: &Container<'_>) -> TokenStream {
    let params = params_ident(&cont.input.ident);
    let params_value = cont.attrs.params_tokens();
    let carried = carried::Carried::of(cont, carried::Role::Factorizable);
    let check = carried.item(cont);
    let variant = variant::expand(cont, &carried);
    let collection = collection::expand(
        cont,
        &variant_ident(&cont.input.ident),
        &carried::Carried::none(),
    );
    let factorize = factorize::expand(cont, &carried);
    let visits = visits::expand(cont, &carried);
    let checks = types::literal_rank_checks(cont);
    let tracked = crate::internals::ranks::track(cont);
    let pv = private();
    quote! {
        #tracked
        #checks
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        const #params: #pv::FactorizeParams = #params_value;
        #check
        #variant
        #collection
        #factorize
        #visits
    }
}
