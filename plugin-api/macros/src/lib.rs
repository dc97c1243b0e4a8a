//! `keepwarm-macros`: the `#[memo]` and `#[export]` attributes of
//! `keepwarm-api`. Use them through `keepwarm_api::memo` and
//! `keepwarm_api::export`; this crate's items are documented there.
//!
//! Both attributes register what they generate in link-time lists (the
//! `linkme` crate's distributed slices, one section per library), which the
//! one-line `keepwarm_api::plugin!(name: "...")` turns into the plugin's
//! descriptor. Each loaded copy of a library has its own sections, so two
//! generations never see each other's lists.
//!
//! ```text
//! #[keepwarm_api::export]
//! #[keepwarm_api::memo]
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//! keepwarm_api::plugin!(name: "example");
//! ```

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{parse_macro_input, Expr, FnArg, ItemFn, LitInt, LitStr, Pat, ReturnType, Type};

/// FNV-1a, 64 bits: a stable hash for code tokens (not for security).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn error(span: Span, message: &str) -> TokenStream {
    syn::Error::new(span, message).to_compile_error().into()
}

/// The argument names and types of a free function; an error for `self` or
/// patterns.
fn plain_args(f: &ItemFn, attr: &str) -> Result<Vec<(syn::Ident, Type)>, TokenStream> {
    let mut args = Vec::new();
    for input in &f.sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(error(
                    r.span(),
                    &format!(
                        "#[{attr}] works on free functions only: `self` cannot be part of a cache key or a JSON call; \
                         move the computation into a free function that takes what it needs"
                    ),
                ))
            }
            FnArg::Typed(t) => match &*t.pat {
                Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => args.push((p.ident.clone(), (*t.ty).clone())),
                other => {
                    return Err(error(
                        other.span(),
                        &format!("#[{attr}] needs a plain argument name here (like `x: u64`), not a pattern"),
                    ))
                }
            },
        }
    }
    if let Some(g) = f.sig.generics.params.first() {
        return Err(error(
            g.span(),
            &format!("#[{attr}] does not support generic functions: the cache and the JSON call need one concrete type per argument"),
        ));
    }
    if let Some(a) = &f.sig.asyncness {
        return Err(error(
            a.span(),
            &format!("#[{attr}] does not support async functions"),
        ));
    }
    Ok(args)
}

/// Memoizes a function in a host cache named after it (see
/// `keepwarm_api::memo` for the documentation).
#[proc_macro_attribute]
pub fn memo(attr: TokenStream, item: TokenStream) -> TokenStream {
    let original = item.clone();
    let f = parse_macro_input!(item as ItemFn);
    let mut name: Option<String> = None;
    let mut max_entries = 0u64;
    let mut max_bytes = 0u64;
    let mut version: Option<u64> = None;
    let mut reset_on_change = false;
    let mut option = false;
    let mut ttl_ms = 0u64;
    let mut key: Option<Expr> = None;
    let mut key_type: Option<Type> = None;
    let mut convert: Option<Expr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse::<LitStr>()?.value());
        } else if meta.path.is_ident("max_entries") {
            max_entries = meta.value()?.parse::<LitInt>()?.base10_parse()?;
        } else if meta.path.is_ident("max_bytes") {
            max_bytes = meta.value()?.parse::<LitInt>()?.base10_parse()?;
        } else if meta.path.is_ident("version") {
            version = Some(meta.value()?.parse::<LitInt>()?.base10_parse()?);
        } else if meta.path.is_ident("reset_on_change") {
            reset_on_change = true;
        } else if meta.path.is_ident("option") {
            option = true;
        } else if meta.path.is_ident("ttl") {
            let secs: u64 = meta.value()?.parse::<LitInt>()?.base10_parse()?;
            if secs == 0 {
                return Err(meta.error("#[memo(ttl = SECONDS)] needs at least 1 second"));
            }
            ttl_ms = secs.saturating_mul(1000);
        } else if meta.path.is_ident("key") {
            // `key = EXPR`, or the `cached` crate's `key = "Type"` with
            // `convert = "{ EXPR }"`.
            let value = meta.value()?;
            if value.peek(LitStr) {
                key_type = Some(value.parse::<LitStr>()?.parse::<Type>()?);
            } else {
                key = Some(value.parse::<Expr>()?);
            }
        } else if meta.path.is_ident("convert") {
            let value = meta.value()?;
            convert = Some(if value.peek(LitStr) {
                value.parse::<LitStr>()?.parse::<Expr>()?
            } else {
                value.parse::<Expr>()?
            });
        } else {
            return Err(meta.error(
                "unknown #[memo] option; expected name = \"...\", max_entries = N, max_bytes = N, version = N, reset_on_change, option, ttl = SECONDS, key = EXPR or key = \"Type\" with convert = \"EXPR\"",
            ));
        }
        Ok(())
    });
    parse_macro_input!(attr with parser);
    let args = match plain_args(&f, "memo") {
        Ok(a) => a,
        Err(e) => return e,
    };
    // The key expression and the fingerprint of its shape.
    let (key_expr, key_shape) = match (key, key_type, convert) {
        (Some(_), Some(_), _) => unreachable!("key is one or the other"),
        (Some(e), None, None) => {
            let tokens = e.to_token_stream().to_string();
            (
                quote!(&(#e)),
                quote!(::keepwarm_api::__private::shape::of_expression(#tokens, &(#e))),
            )
        }
        (None, Some(ty), Some(e)) => {
            let tokens = e.to_token_stream().to_string();
            (
                quote!(&{ let __kw_key: #ty = #e; __kw_key }),
                quote!({
                    #[allow(unused_imports)]
                    use ::keepwarm_api::__private::shape::{ViaName as _, ViaTrace as _};
                    ::keepwarm_api::__private::shape::tag(
                        (&::keepwarm_api::__private::shape::Probe::<#ty>::new()).shape(),
                        &[::keepwarm_api::__private::shape::of_expression(#tokens, "")],
                    )
                }),
            )
        }
        (None, Some(ty), None) => {
            return error(
                ty.span(),
                "#[memo(key = \"Type\")] needs convert = \"EXPR\" to compute the key (or write key = EXPR)",
            )
        }
        (Some(_), None, Some(e)) | (None, None, Some(e)) => {
            return error(
                e.span(),
                "#[memo(convert = ...)] goes with key = \"Type\"; or write key = EXPR alone",
            )
        }
        (None, None, None) => {
            let names: Vec<_> = args.iter().map(|(n, _)| n).collect();
            // Each key part's shape: its owned type traced, else its name.
            let parts = args.iter().map(|(_, ty)| {
                let owned = owned_type(ty);
                quote!((&::keepwarm_api::__private::shape::Probe::<#owned>::new()).shape())
            });
            (
                quote!(&(#(&#names,)*)),
                quote!({
                    #[allow(unused_imports)]
                    use ::keepwarm_api::__private::shape::{ViaName as _, ViaTrace as _};
                    ::keepwarm_api::__private::shape::tag(0, &[#(#parts),*])
                }),
            )
        }
    };
    let ReturnType::Type(_, ret) = &f.sig.output else {
        return error(
            f.sig.span(),
            "#[memo] needs a function that returns a value to cache",
        );
    };
    let cache = name.unwrap_or_else(|| f.sig.ident.to_string());
    // The code hash names what the cache's entries depend on: the
    // function's own tokens (with reset_on_change), the version (with
    // version = N), and which of the two the attribute asks for. It is never
    // 0, so adding `version` or `reset_on_change` to a plain #[memo] changes
    // it and resets the cache; a plain #[memo] keeps one hash through body
    // edits (by design: its entries survive them).
    let body = if reset_on_change {
        fnv64(original.to_string().as_bytes())
    } else {
        0
    };
    let code_hash = fnv64(
        &[
            b"keepwarm memo identity 1".as_slice(),
            &body.to_le_bytes(),
            &[u8::from(reset_on_change), u8::from(version.is_some())],
            &version.unwrap_or(0).to_le_bytes(),
        ]
        .concat(),
    ) | 1;
    // The identity a shared tier shares the entries under: always the
    // body (with the version and which options were asked), whatever
    // reset_on_change says; the module path is added where it is known.
    let shared_code = fnv64(
        &[
            b"keepwarm memo shared identity 1".as_slice(),
            original.to_string().as_bytes(),
            &[u8::from(reset_on_change), u8::from(version.is_some())],
            &version.unwrap_or(0).to_le_bytes(),
        ]
        .concat(),
    );
    let returns_option = matches!(&**ret, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Option"));
    if option && !returns_option {
        return error(
            ret.span(),
            "#[memo(option)] caches only `Some`: it needs a function that returns Option<T>",
        );
    }
    // Failures are not cached: a `Result` keeps only `Ok`; an `Option`
    // keeps only `Some` when `option` asks for it.
    let keep = if returns_result(&f.sig.output) {
        quote!(|v: &#ret| v.is_ok())
    } else if option {
        quote!(|v: &#ret| v.is_some())
    } else {
        quote!(|_: &#ret| true)
    };
    let attrs = &f.attrs;
    let vis = &f.vis;
    let sig = &f.sig;
    let block = &f.block;
    let checks = args.iter().map(|(_, ty)| {
        quote_spanned! {ty.span()=> ::keepwarm_api::__private::assert_key::<#ty>(); }
    });
    let ret_check =
        quote_spanned! {ret.span()=> ::keepwarm_api::__private::assert_value::<#ret>(); };
    quote! {
        #(#attrs)*
        #vis #sig {
            #[::keepwarm_api::__private::linkme::distributed_slice(::keepwarm_api::__private::MEMO_CACHES)]
            #[linkme(crate = ::keepwarm_api::__private::linkme)]
            static __KW_MEMO_CACHE: ::keepwarm_api::abi::KwCacheDecl = ::keepwarm_api::cache(#cache)
                .max_entries(#max_entries)
                .max_bytes(#max_bytes)
                .code_hash({
                    // The module path is part of the identity: two #[memo]
                    // functions of one name in two modules never share
                    // entries (the host refuses such a plugin).
                    ::keepwarm_api::__private::fnv_str(#code_hash, ::core::module_path!()) | 1
                });
            // The shape of the values and keys, traced on first use in each
            // generation: an entry of another shape is a miss, never a hit.
            fn __kw_memo_shape() -> u64 {
                ::keepwarm_api::__private::shape::tag(
                    ::keepwarm_api::__private::shape::of::<#ret>(),
                    &[__KW_MEMO_KEY_SHAPE.load(::core::sync::atomic::Ordering::Relaxed)],
                )
            }
            static __KW_MEMO_KEY_SHAPE: ::core::sync::atomic::AtomicU64 = ::core::sync::atomic::AtomicU64::new(0);
            const __KW_MEMO_CODE: u64 =
                ::keepwarm_api::__private::fnv_str(#shared_code, ::core::module_path!()) | 1;
            #[::keepwarm_api::__private::linkme::distributed_slice(::keepwarm_api::__private::MEMO_CODES)]
            #[linkme(crate = ::keepwarm_api::__private::linkme)]
            static __KW_MEMO_CODE_DECL: (&'static str, u64) = (#cache, __KW_MEMO_CODE);
            static __KW_MEMO_HANDLE: ::keepwarm_api::HostCache =
                ::keepwarm_api::__private::memo_cache(#cache, __kw_memo_shape, #ttl_ms, __KW_MEMO_CODE);
            #(#checks)*
            #ret_check
            if __KW_MEMO_KEY_SHAPE.load(::core::sync::atomic::Ordering::Relaxed) == 0 {
                __KW_MEMO_KEY_SHAPE.store(#key_shape | 1, ::core::sync::atomic::Ordering::Relaxed);
            }
            let __kw_key = ::keepwarm_api::__private::encode_key(#key_expr);
            ::keepwarm_api::__private::cached_key_if(
                ::keepwarm_api::__private::Target::Static(&__KW_MEMO_HANDLE),
                __kw_key,
                move || -> #ret #block,
                #keep,
            )
        }
    }
    .into()
}

/// The owned form of an argument type, as a key's shape is traced: `&str`
/// is `String`, `&[T]` is `Vec<T>`, `&T` is `T`.
fn owned_type(ty: &Type) -> TokenStream2 {
    match ty {
        Type::Reference(r) => match &*r.elem {
            Type::Path(p) if p.path.is_ident("str") => quote!(::std::string::String),
            Type::Slice(s) => {
                let e = &s.elem;
                quote!(::std::vec::Vec<#e>)
            }
            other => other.to_token_stream(),
        },
        other => other.to_token_stream(),
    }
}

/// Whether a return type is spelled `Result<...>` (then its error is the
/// call's error).
fn returns_result(ret: &ReturnType) -> bool {
    match ret {
        ReturnType::Type(_, ty) => match &**ty {
            Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == "Result"),
            _ => false,
        },
        ReturnType::Default => false,
    }
}

/// A type as a person writes it: `Vec<(u8, String)>`, `&'static str`.
fn type_text(ty: &Type) -> String {
    let raw = ty.to_token_stream().to_string();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.peek().copied();
            let glue_before = matches!(next, Some('<' | '>' | ',' | ')' | ']' | ':' | ';'));
            let glue_after = matches!(prev, Some('<' | '(' | '[' | '&' | ':'));
            if glue_before || glue_after {
                continue;
            }
        }
        out.push(c);
    }
    // `&'a mut T`, `[u8; 4]` read better with their spaces.
    out.replace(";", "; ")
        .replace(";  ", "; ")
        .replace(",", ", ")
        .replace(",  ", ", ")
}

/// The type a call answers with: `T` for `Result<T, E>`, `()` for none.
fn result_text(ret: &ReturnType) -> String {
    match ret {
        ReturnType::Default => "()".to_owned(),
        ReturnType::Type(_, ty) => {
            if let Type::Path(p) = &**ty {
                if let Some(last) = p.path.segments.last() {
                    if last.ident == "Result" {
                        if let syn::PathArguments::AngleBracketed(a) = &last.arguments {
                            if let Some(syn::GenericArgument::Type(ok)) = a.args.first() {
                                return type_text(ok);
                            }
                        }
                    }
                }
            }
            type_text(ty)
        }
    }
}

/// Makes a function callable by `keepwarm call` (see `keepwarm_api::export`).
#[proc_macro_attribute]
pub fn export(attr: TokenStream, item: TokenStream) -> TokenStream {
    let f = parse_macro_input!(item as ItemFn);
    let mut name: Option<String> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse::<LitStr>()?.value());
            Ok(())
        } else {
            Err(meta.error("unknown #[export] option; expected name = \"...\""))
        }
    });
    parse_macro_input!(attr with parser);
    let args = match plain_args(&f, "export") {
        Ok(a) => a,
        Err(e) => return e,
    };
    let ident = &f.sig.ident;
    let exported = name.unwrap_or_else(|| ident.to_string());
    let count = args.len();
    let mut decode = Vec::new();
    let mut pass = Vec::new();
    for (i, (arg, ty)) in args.iter().enumerate() {
        let tmp = format_ident!("__kw_arg_{}", arg);
        // A borrowed argument is decoded as its owned form and lent.
        let (owned, borrow) = match ty {
            Type::Reference(r) => {
                let inner = &*r.elem;
                let owned = match inner {
                    Type::Path(p) if p.path.is_ident("str") => quote!(::std::string::String),
                    Type::Slice(s) => {
                        let e = &s.elem;
                        quote!(::std::vec::Vec<#e>)
                    }
                    other => other.to_token_stream(),
                };
                (owned, true)
            }
            other => (other.to_token_stream(), false),
        };
        decode.push(quote_spanned! {ty.span()=>
            let #tmp: #owned = __kw_args.get(#i)?;
        });
        pass.push(if borrow { quote!(&#tmp) } else { quote!(#tmp) });
    }
    let signature = format!(
        "{exported}({}) -> {}",
        args.iter()
            .map(|(arg, ty)| format!("{arg}: {}", type_text(ty)))
            .collect::<Vec<_>>()
            .join(", "),
        result_text(&f.sig.output)
    );
    let call = if returns_result(&f.sig.output) {
        quote!(#ident(#(#pass),*).map_err(|e| ::keepwarm_api::Error::new(e.to_string())))
    } else {
        quote!(::std::result::Result::<_, ::keepwarm_api::Error>::Ok(#ident(#(#pass),*)))
    };
    let shell: TokenStream2 = quote! {
        const _: () = {
            unsafe extern "C" fn __kw_shell(
                args: ::keepwarm_api::abi::KwSlice,
                out: *mut ::keepwarm_api::abi::KwOutput,
            ) -> ::keepwarm_api::abi::KwStatus {
                // SAFETY: the host passes arguments and an output valid for
                // the duration of this call.
                unsafe {
                    ::keepwarm_api::__private::call_json(#exported, args, out, |__kw_args: &::keepwarm_api::Args| {
                        __kw_args.expect_len(#count)?;
                        #(#decode)*
                        #call
                    })
                }
            }
            #[::keepwarm_api::__private::linkme::distributed_slice(::keepwarm_api::__private::EXPORTS)]
            #[linkme(crate = ::keepwarm_api::__private::linkme)]
            static __KW_EXPORT: ::keepwarm_api::__private::Export = ::keepwarm_api::__private::Export {
                function: ::keepwarm_api::abi::KwFunction {
                    name: ::keepwarm_api::abi::KwSlice::from_str(#exported),
                    call: __kw_shell,
                },
                signature: ::keepwarm_api::abi::KwSlice::from_str(#signature),
            };
        };
    };
    quote!(#f #shell).into()
}
