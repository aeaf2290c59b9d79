//! `#[mirror]`: copies an `impl` block of the model onto its factorized variant.

use proc_macro2::TokenStream;
use quote::quote;
use syn::spanned::Spanned;
use syn::{ItemImpl, Type};

use super::variant_ident;

pub fn expand(item: TokenStream) -> syn::Result<TokenStream> {
    let original: ItemImpl = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "#[mirror] goes on an `impl .. for Model<..>` block (e.g. the model's `Module` impl)",
        )
    })?;
    let mut mirrored = original.clone();
    let Type::Path(path) = mirrored.self_ty.as_mut() else {
        return Err(syn::Error::new(
            original.self_ty.span(),
            "#[mirror] needs the model's struct as the implementing type",
        ));
    };
    let Some(last) = path.path.segments.last_mut() else {
        return Err(syn::Error::new(path.span(), "#[mirror] needs a named type"));
    };
    last.ident = variant_ident(&last.ident);
    Ok(quote!(#original #mirrored))
}
