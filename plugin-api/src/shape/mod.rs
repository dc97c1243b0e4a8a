//! Shape fingerprints: what the bytes of a cached value (and of its key)
//! mean, so that an entry written by a build whose types differed is never
//! decoded into the new types.
//!
//! postcard is not self-describing: `struct P { a: u32, b: u32 }` and
//! `struct P { b: u32, a: u32 }` encode alike, so a tag of the type's *name*
//! would let old entries decode into swapped fields. The fingerprint is
//! instead a hash of the type's full structure as serde sees it — container
//! and field names in order, field types recursively, enum variants — traced
//! once per generation with `serde-reflection`. A type whose `Deserialize`
//! cannot be traced (it validates its input, or asks for self-describing
//! data) falls back to a hash of its type name, as before.

use std::any::type_name;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::de::DeserializeOwned;
use serde_reflection::{Samples, Tracer, TracerConfig};

mod depth;

/// FNV-1a, 64 bits, continuing from `hash`.
const fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The fingerprint of a type by its name only (the fallback).
///
/// ```
/// # use keepwarm_api::__private::shape;
/// assert_ne!(shape::by_name::<u32>(), shape::by_name::<i64>());
/// ```
pub fn by_name<T: ?Sized>() -> u64 {
    fnv(
        fnv(FNV_START, b"keepwarm shape by name:"),
        type_name::<T>().as_bytes(),
    )
}

/// The fingerprint of `T`'s full structure, traced through its
/// `Deserialize`; `None` when it cannot be traced.
///
/// ```
/// # use keepwarm_api::__private::shape;
/// #[derive(serde::Deserialize)]
/// struct P { a: u32, b: u32 }
/// mod swapped {
///     #[derive(serde::Deserialize)]
///     pub struct P { pub b: u32, pub a: u32 }
/// }
/// assert_ne!(shape::traced::<P>(), shape::traced::<swapped::P>());
/// assert!(shape::traced::<P>().is_some());
/// assert_eq!(shape::traced::<u32>(), shape::traced::<u32>());
/// assert_ne!(shape::traced::<u32>(), shape::traced::<i64>());
/// ```
pub fn traced<T: DeserializeOwned>() -> Option<u64> {
    let samples = Samples::new();
    let watch = depth::Watch::default();
    let traced = catch_unwind(AssertUnwindSafe(|| {
        let mut tracer = Tracer::new(TracerConfig::default());
        // `trace_type` passes until every variant of T itself is seen.
        let (root, _values) = tracer
            .trace_type_with_seed(&samples, depth::Seed::<T>::new(&watch))
            .ok()?;
        // Enums nested behind an Option, a sequence or a map are seen
        // through their first variants only; the watch's log still names
        // all their variants.
        Some((root, tracer.registry_unchecked()))
    }));
    let shape = traced.ok().flatten()?;
    let bytes = postcard::to_stdvec(&shape).ok()?;
    let hash = fnv(fnv(FNV_START, b"keepwarm shape traced:"), &bytes);
    Some(fnv(fnv(hash, type_name::<T>().as_bytes()), &watch.log()))
}

/// The fingerprint of `T`: traced, else by name.
pub fn of<T: DeserializeOwned>() -> u64 {
    traced::<T>().unwrap_or_else(by_name::<T>)
}

/// The tag stored before each value of a memoized function: the shape of
/// the value and of each key part, never 0.
///
/// ```
/// # use keepwarm_api::__private::shape;
/// let a = shape::tag(shape::of::<u32>(), &[shape::of::<u64>()]);
/// assert_ne!(a, 0);
/// assert_ne!(a, shape::tag(shape::of::<u64>(), &[shape::of::<u64>()]));
/// assert_ne!(a, shape::tag(shape::of::<u32>(), &[shape::of::<u32>()]));
/// ```
pub fn tag(value: u64, key: &[u64]) -> u64 {
    let mut hash = fnv(fnv(FNV_START, b"keepwarm tag 1"), &value.to_le_bytes());
    for k in key {
        hash = fnv(hash, &k.to_le_bytes());
    }
    hash | 1
}

/// A stand-in for a key part's type, to pick its fingerprint at the call
/// site: traced when the type is `DeserializeOwned` ([`ViaTrace`]), by name
/// otherwise ([`ViaName`]). `#[memo]` calls
/// `(&Probe::<T>::new()).shape()` with both traits in scope; method
/// resolution prefers `ViaTrace` when its bound holds.
pub struct Probe<T: ?Sized>(PhantomData<T>);

impl<T: ?Sized> Probe<T> {
    /// The probe of `T`.
    pub const fn new() -> Probe<T> {
        Probe(PhantomData)
    }
}

impl<T: ?Sized> Default for Probe<T> {
    fn default() -> Self {
        Probe::new()
    }
}

/// The fingerprint of a traceable key part.
pub trait ViaTrace {
    /// The fingerprint.
    fn shape(&self) -> u64;
}

impl<T: DeserializeOwned> ViaTrace for Probe<T> {
    fn shape(&self) -> u64 {
        of::<T>()
    }
}

/// The fingerprint of any other key part: its type's name.
pub trait ViaName {
    /// The fingerprint.
    fn shape(&self) -> u64;
}

impl<T: ?Sized> ViaName for &Probe<T> {
    fn shape(&self) -> u64 {
        by_name::<T>()
    }
}

/// The fingerprint of a custom key expression (`#[memo(key = ...)]`): its
/// tokens, and its type's name.
pub fn of_expression<K: ?Sized>(tokens: &str, _key: &K) -> u64 {
    fnv(fnv(by_name::<K>(), b"expression:"), tokens.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Tree {
        Leaf(u32),
        Node(Vec<Tree>),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Nested {
        inner: Option<Inner>,
        list: Vec<Inner>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Inner {
        A,
        B(u8),
        C { x: i16 },
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    enum Expr {
        Add(Box<Expr>, Box<Expr>),
        Num(i64),
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct Node {
        name: String,
        kids: Vec<Node>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize)]
    struct NonZeroField {
        n: std::num::NonZeroU32,
    }

    #[test]
    fn recursive_and_nested_types_are_traced() {
        assert!(traced::<Tree>().is_some());
        assert!(traced::<Nested>().is_some());
        assert!(traced::<(u32, Vec<Inner>, String)>().is_some());
        assert!(traced::<Result<u64, String>>().is_some());
        assert!(traced::<std::collections::HashMap<String, Vec<f64>>>().is_some());
        assert!(traced::<Node>().is_some());
    }

    #[test]
    fn a_first_variant_that_recurses_falls_back_instead_of_overflowing() {
        assert_eq!(traced::<Expr>(), None);
        assert_eq!(of::<Expr>(), by_name::<Expr>());
    }

    #[test]
    fn a_new_variant_of_a_nested_enum_counts() {
        mod after {
            #[allow(dead_code)]
            #[derive(serde::Deserialize)]
            pub enum Inner {
                A,
                B(u8),
                C { x: i16 },
                D,
            }
            #[allow(dead_code)]
            #[derive(serde::Deserialize)]
            pub struct Nested {
                pub inner: Option<Inner>,
                pub list: Vec<Inner>,
            }
        }
        // Adding a variant to a nested enum changes the shape.
        assert!(traced::<after::Nested>().is_some());
        assert_ne!(traced::<Nested>(), traced::<after::Nested>());
    }

    #[test]
    fn untraceable_types_fall_back_to_their_name() {
        // serde_json::Value asks for self-describing input.
        assert_eq!(traced::<serde_json::Value>(), None);
        assert_eq!(of::<serde_json::Value>(), by_name::<serde_json::Value>());
        // A validating Deserialize (0 is not a NonZeroU32) may not trace either;
        // either way it has a fingerprint.
        let _ = of::<NonZeroField>();
    }

    #[test]
    // The borrow is the point: it is what lets method resolution fall back
    // from ViaTrace (on Probe<T>) to ViaName (on &Probe<T>).
    #[allow(clippy::needless_borrow)]
    fn probes_pick_tracing_when_they_can() {
        #[allow(unused_imports)]
        use super::{ViaName as _, ViaTrace as _};
        assert_eq!((&Probe::<u32>::new()).shape(), of::<u32>());
        assert_eq!((&Probe::<str>::new()).shape(), by_name::<str>());
    }
}
