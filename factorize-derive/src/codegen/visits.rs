//! The walks the model-level calibration needs: the original's dense layers and the variant's
//! factorized layers, by path. Skipped fields are not walked (they may be any type).

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::carried::Carried;
use super::variant_ident;
use crate::internals::ast::Container;

pub fn expand(cont: &Container<'_>, carried: &Carried) -> TokenStream {
    let pv = super::private();
    let input = cont.input;
    let ident = &input.ident;
    let variant = variant_ident(ident);
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let walked: Vec<_> = cont
        .fields
        .iter()
        .filter(|f| f.attrs.skip.is_none())
        .collect();
    let dense = walked.iter().map(|f| {
        let name = f.ident;
        let s = name.to_string();
        let ty = &f.original.ty;
        let named = carried.holding(ty, &f.node);
        quote_spanned!(super::at(ty.span())=>
            <#named as #pv::VisitDense>::visit_dense(&self.#name, &#pv::join(__path, #s), __f);)
    });
    let factorized = walked.iter().map(|f| {
        let name = f.ident;
        let s = name.to_string();
        quote_spanned!(super::at(f.original.ty.span())=>
            #pv::VisitFactorized::visit_factorized(&mut self.#name, &#pv::join(__path, #s), __f)?;)
    });
    quote! {
        impl #impl_generics #pv::VisitDense for #ident #ty_generics #where_clause {
            fn visit_dense(
                &self,
                __path: &str,
                __f: &mut #pv::DenseVisitor<'_>,
            ) {
                #(#dense)*
            }
        }

        impl #impl_generics #pv::VisitFactorized for #variant #ty_generics #where_clause {
            fn visit_factorized(
                &mut self,
                __path: &str,
                __f: &mut #pv::FactorizedVisitor<'_>,
            ) -> ::core::result::Result<(), #pv::FactorizeError> {
                #(#factorized)*
                ::core::result::Result::Ok(())
            }
        }
    }
}
