//! The `#[derive(Factorizable)]`, `#[derive(TensorCollection)]` and `#[mirror]` macros of `factorize_runtime`.
//!
//! Use them through `factorize_runtime`, which re-exports them: generated code names only
//! `::factorize_runtime::…` paths. See `factorize_runtime::Factorizable` for the full story.

mod codegen;
mod internals;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

use internals::ast::{Container, Derive};
use internals::{check, ctxt::Ctxt, ranks};

/// Derives `Factorizable` and generates `{Name}Factorized`; see `factorize_runtime`.
#[proc_macro_derive(Factorizable, attributes(factorize))]
pub fn derive_factorizable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand_derive(&input, Derive::Factorizable)
        .unwrap_or_else(|e| {
            let fallback = codegen::fallback(&input);
            let error = e.into_compile_error();
            quote::quote!(#error #fallback)
        })
        .into()
}

/// Parsing, checks, then code generation: nothing is generated when any check failed.
fn expand_derive(input: &DeriveInput, derive: Derive) -> syn::Result<proc_macro2::TokenStream> {
    let mut cx = Ctxt::default();
    let mut cont = Container::from_ast(&mut cx, input, derive);
    if let (Some(cont), Derive::Factorizable) = (&mut cont, derive) {
        ranks::apply(&mut cx, cont);
        check::check(&mut cx, cont);
    }
    cx.check()?;
    Ok(match (cont, derive) {
        (None, _) => proc_macro2::TokenStream::new(),
        (Some(cont), Derive::Factorizable) => codegen::expand(&cont),
        (Some(cont), Derive::TensorCollection) => {
            let fields =
                codegen::carried::Carried::of(&cont, codegen::carried::Role::TensorCollection);
            codegen::collection::expand(&cont, &cont.input.ident, &fields)
        }
    })
}

/// Derives dfdx's `TensorCollection` for a model struct (build, optimizers, safetensors); see
/// `factorize_runtime`.
#[proc_macro_derive(TensorCollection)]
pub fn derive_tensor_collection(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand_derive(&input, Derive::TensorCollection)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Declares a dfdx sequential model (a tuple of builders) and names its factorized variant;
/// see `factorize_runtime::sequential`.
#[proc_macro]
pub fn sequential(input: TokenStream) -> TokenStream {
    codegen::sequential::expand(input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Copies the `impl` block it annotates onto the factorized variant, so the model's forward is
/// written once: `#[mirror] impl Module<X> for Mlp<E, D> { .. }` also implements it for
/// `MlpFactorized<E, D>`.
#[proc_macro_attribute]
pub fn mirror(args: TokenStream, item: TokenStream) -> TokenStream {
    if !args.is_empty() {
        let args = proc_macro2::TokenStream::from(args);
        return syn::Error::new_spanned(args, "#[mirror] takes no arguments")
            .into_compile_error()
            .into();
    }
    codegen::mirror::expand(item.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
