//! dfdx's `TensorCollection` for the variant, and for the original under
//! `#[derive(TensorCollection)]`: build, reset, device and dtype moves, optimizers, safetensors.

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::GenericParam;

use super::carried::Carried;
use crate::internals::ast::Container;

/// dfdx implements `ModuleFields` for tuples of up to six elements; larger structs nest them.
const CHUNK: usize = 6;

fn nest(items: Vec<TokenStream>) -> TokenStream {
    if items.len() <= CHUNK {
        return quote!(( #(#items,)* ));
    }
    let chunks: Vec<TokenStream> = items
        .chunks(CHUNK)
        .map(|c| {
            let c = c.to_vec();
            quote!(( #(#c,)* ))
        })
        .collect();
    nest(chunks)
}

/// The impl for `target`: the struct itself or its variant, which share generics and field names.
/// Fields are named through `carried` (see `carried.rs`): the struct's own impl checks its
/// fields once; the variant's fields are already checked types.
pub fn expand(cont: &Container<'_>, target: &Ident, carried: &Carried) -> TokenStream {
    let pv = super::private();
    let input = cont.input;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let (e, d) = (&cont.dtype, &cont.device);
    let e2 = format_ident!("__E2");
    let d2 = format_ident!("__D2");
    let to_args = input.generics.params.iter().map(|p| match p {
        GenericParam::Lifetime(l) => {
            let l = &l.lifetime;
            quote!(#l)
        }
        GenericParam::Type(t) if t.ident == *e => quote!(#e2),
        GenericParam::Type(t) if t.ident == *d => quote!(#d2),
        GenericParam::Type(t) => {
            let i = &t.ident;
            quote!(#i)
        }
        GenericParam::Const(c) => {
            let i = &c.ident;
            quote!(#i)
        }
    });
    let names: Vec<&Ident> = cont.fields.iter().map(|f| f.ident).collect();
    // Spanned at the field's type, so that a field that is not a module is an error there.
    let visits = nest(
        cont.fields
            .iter()
            .map(|f| {
                let (n, s, ty) = (f.ident, f.ident.to_string(), &f.original.ty);
                let field = if carried.checks(ty) {
                    let named = carried.leaf(ty);
                    quote!(::<_, _, #named>)
                } else {
                    TokenStream::new()
                };
                quote_spanned!(super::at(ty.span())=>
                    Self::module #field(#s, |s| &s.#n, |s| &mut s.#n))
            })
            .collect(),
    );
    let pattern = nest(names.iter().map(|n| quote!(#n)).collect());
    let mut predicates: Vec<TokenStream> = where_clause
        .map(|w| w.predicates.iter().map(|p| quote!(#p)).collect())
        .unwrap_or_default();
    predicates.push(quote!(#e: #pv::Float + #pv::SampleUniform));
    let check = carried.item(cont);
    quote! {
        #check
        impl #impl_generics #pv::TensorCollection<#e, #d> for #target #ty_generics
        where #(#predicates,)*
        {
            type To<#e2: #pv::Dtype, #d2: #pv::Device<#e2>> = #target<#(#to_args),*>;

            fn iter_tensors<__V: #pv::ModuleVisitor<Self, #e, #d>>(
                visitor: &mut __V,
            ) -> ::core::result::Result<::core::option::Option<Self::To<__V::E2, __V::D2>>, __V::Err> {
                visitor.visit_fields(#visits, |#pattern| #target { #(#names,)* })
            }
        }
    }
}
