//! A serde adapter that watches a deserialization: it bounds how deep it
//! may nest, and logs what the type asks for.
//!
//! Tracing a type's shape deserializes it from nothing, and a recursive type
//! whose first enum variant recurses (`enum Expr { Add(Box<Expr>, Box<Expr>),
//! Num(i64) }`) would recurse until the stack overflows, which no thread
//! survives. Every nested deserializer goes through [`Limited`], which counts
//! the nesting in its [`Watch`] and fails past [`MAX_DEPTH`]: the type is
//! then identified by its name instead.
//!
//! The log records each request in order — `deserialize_struct` with its
//! name and field names, `deserialize_enum` with *all* its variant names,
//! the primitive asked for at each position — which covers what the
//! tracer's registry leaves out (the variants it did not visit).
//!
//! No crate offers this as an adapter (`serde_stacker` grows the stack
//! instead, which for infinite recursion only moves the failure to memory).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Deepest nesting a traced type may have.
pub const MAX_DEPTH: usize = 128;

/// The state of one watched deserialization: how deep it is, and what it
/// asked for so far. Kept in the tracing call's frame (no thread-local: a
/// plugin's thread-local with a destructor would pin its library).
#[derive(Default)]
pub struct Watch {
    depth: Cell<usize>,
    log: RefCell<Vec<u8>>,
}

impl Watch {
    /// What the deserialization asked for, in order.
    pub fn log(&self) -> Vec<u8> {
        self.log.borrow().clone()
    }

    /// Logs one request (`what`, then each of `parts`).
    fn note(&self, what: &str, parts: &[&str]) {
        let mut log = self.log.borrow_mut();
        log.extend_from_slice(what.as_bytes());
        for part in parts {
            log.push(0);
            log.extend_from_slice(part.as_bytes());
        }
        log.push(0xff);
    }

    fn enter<E: de::Error>(&self) -> Result<Level<'_>, E> {
        self.depth.set(self.depth.get() + 1);
        let level = Level(self);
        if self.depth.get() > MAX_DEPTH {
            return Err(E::custom("type nests too deeply to be traced"));
        }
        Ok(level)
    }
}

/// One level of nesting, left when dropped.
struct Level<'w>(&'w Watch);

impl Drop for Level<'_> {
    fn drop(&mut self) {
        self.0.depth.set(self.0.depth.get() - 1);
    }
}

/// A deserializer, visitor, access or seed whose nested deserializers are
/// all watched too.
#[derive(Clone, Copy)]
pub struct Limited<'w, T>(pub T, pub &'w Watch);

/// `T::deserialize` through a [`Limited`] deserializer.
pub struct Seed<'w, T>(PhantomData<fn() -> T>, &'w Watch);

impl<'w, T> Seed<'w, T> {
    /// The seed of `T`, watched by `watch`.
    pub fn new(watch: &'w Watch) -> Seed<'w, T> {
        Seed(PhantomData, watch)
    }
}

impl<T> Clone for Seed<'_, T> {
    fn clone(&self) -> Self {
        Seed::new(self.1)
    }
}

impl<'de, T: de::Deserialize<'de>> DeserializeSeed<'de> for Seed<'_, T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        T::deserialize(Limited(d, self.1))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Limited<'_, S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Limited(d, self.1))
    }
}

/// A request's arguments as log parts.
trait Part {
    fn parts(&self) -> Vec<String>;
}

impl Part for &'static str {
    fn parts(&self) -> Vec<String> {
        vec![(*self).to_owned()]
    }
}

impl Part for usize {
    fn parts(&self) -> Vec<String> {
        vec![self.to_string()]
    }
}

impl Part for &'static [&'static str] {
    fn parts(&self) -> Vec<String> {
        self.iter().map(|s| (*s).to_owned()).collect()
    }
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                #[allow(unused_mut)]
                let mut parts: Vec<String> = Vec::new();
                $( parts.extend(Part::parts(&$arg)); )*
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                self.1.note(stringify!($method), &parts);
                let _level = self.1.enter::<D::Error>()?;
                self.0.$method($($arg,)* Limited(visitor, self.1))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Limited<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Limited(d, self.1))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(Limited(d, self.1))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(Limited(seq, self.1))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Limited(map, self.1))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(Limited(data, self.1))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Limited(seed, self.1))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Limited(seed, self.1))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Limited(seed, self.1))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'w, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Limited<'w, A> {
    type Error = A::Error;
    type Variant = Limited<'w, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Limited(seed, self.1))?;
        Ok((value, Limited(variant, self.1)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let _level = self.1.enter::<A::Error>()?;
        self.0.newtype_variant_seed(Limited(seed, self.1))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let _level = self.1.enter::<A::Error>()?;
        self.0.tuple_variant(len, Limited(visitor, self.1))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let _level = self.1.enter::<A::Error>()?;
        self.0.struct_variant(fields, Limited(visitor, self.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_unwind_on_errors_and_values_pass_through() {
        let watch = Watch::default();
        let r: Result<u32, serde_json::Error> = Seed::<u32>::new(&watch)
            .deserialize(&mut serde_json::Deserializer::from_str("\"not a number\""));
        assert!(r.is_err());
        assert_eq!(watch.depth.get(), 0);
        let v: Vec<Vec<u8>> = Seed::new(&watch)
            .deserialize(&mut serde_json::Deserializer::from_str("[[1],[2,3]]"))
            .unwrap();
        assert_eq!(v, vec![vec![1], vec![2, 3]]);
        assert_eq!(watch.depth.get(), 0);
        assert!(String::from_utf8_lossy(&watch.log()).contains("deserialize_seq"));
    }
}
