//! `impl Factorizable for Model`: builds the variant field by field.

use proc_macro2::TokenStream;
use quote::quote;

use super::carried::Carried;
use super::types::FieldWalk;
use super::variant_ident;
use crate::internals::ast::Container;

pub fn expand(cont: &Container<'_>, carried: &Carried) -> TokenStream {
    let pv = super::private();
    let input = cont.input;
    let ident = &input.ident;
    let variant = variant_ident(ident);
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let fields = cont.fields.iter().map(|f| {
        let name = f.ident;
        let s = name.to_string();
        let value = FieldWalk::of(cont, f, carried).value(
            &f.node,
            quote!(&self.#name),
            quote!(&#pv::join(__path, #s)),
        );
        quote!(#name: #value)
    });
    quote! {
        impl #impl_generics #pv::Factorizable for #ident #ty_generics #where_clause {
            type Factorized = #variant #ty_generics;

            fn factorize_into(
                &self,
                __path: &str,
                __cfg: &#pv::FactorizeConfig,
                __report: &mut #pv::FactorizeReport,
            ) -> ::core::result::Result<Self::Factorized, #pv::FactorizeError> {
                // Fields are built in order from borrowed weights; an error drops what was
                // built so far and leaves `self` as it was.
                ::core::result::Result::Ok(#variant {
                    #(#fields,)*
                })
            }
        }
    }
}
