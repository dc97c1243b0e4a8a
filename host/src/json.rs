//! Reading and writing the runtime's JSON objects by hand: the runtime
//! depends on serde's traits but not on its derive macros (no proc-macro
//! crate in its tree). Each public type implements `Serialize` and
//! `Deserialize` through a `serde_json::Value`, with the checks a derive
//! would make: required fields, types, and unknown fields refused by name.

use serde_json::{Map, Value};

/// The fields of one JSON object, read by name.
pub(crate) struct Object<'a> {
    map: &'a Map<String, Value>,
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Object<'a> {
    /// `value` as an object of `what` whose fields are all in `known`.
    pub fn new(value: &'a Value, what: &str, known: &[&str]) -> Result<Object<'a>, String> {
        let Value::Object(map) = value else {
            return Err(format!(
                "invalid type: {}, expected {what} (a JSON object)",
                kind(value)
            ));
        };
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            return Err(format!(
                "unknown field `{unknown}`, expected one of {}",
                expected.join(", ")
            ));
        }
        Ok(Object { map })
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(key: &str, value: &Value, expected: &str) -> String {
        format!(
            "invalid type for `{key}`: {}, expected {expected}",
            kind(value)
        )
    }

    /// A string field that may be absent or null.
    pub fn opt_str(&self, key: &str) -> Result<Option<String>, String> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(Self::wrong(key, v, "a string")),
        }
    }

    /// A string field that must be there.
    pub fn str(&self, key: &str) -> Result<String, String> {
        self.opt_str(key)?
            .ok_or_else(|| format!("missing field `{key}`"))
    }

    /// An unsigned integer field that may be absent or null.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, v, "an unsigned integer")),
        }
    }

    /// An unsigned integer field, 0 when absent.
    pub fn u64_or_0(&self, key: &str) -> Result<u64, String> {
        Ok(self.opt_u64(key)?.unwrap_or(0))
    }

    /// An unsigned integer field that must be there.
    pub fn u64(&self, key: &str) -> Result<u64, String> {
        self.opt_u64(key)?
            .ok_or_else(|| format!("missing field `{key}`"))
    }

    /// A number field that may be absent or null.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, v, "a number")),
        }
    }

    /// A boolean field, false when absent.
    pub fn bool_or_false(&self, key: &str) -> Result<bool, String> {
        match self.present(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Self::wrong(key, v, "a boolean")),
        }
    }

    /// An array field, empty when absent.
    pub fn array_or_empty(&self, key: &str) -> Result<Vec<Value>, String> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(v) => Err(Self::wrong(key, v, "an array")),
        }
    }

    /// An array of strings, empty when absent.
    pub fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        self.array_or_empty(key)?
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(Self::wrong(key, &other, "an array of strings")),
            })
            .collect()
    }

    /// Any JSON value, `None` when absent (null is a value here).
    pub fn value(&self, key: &str) -> Option<Value> {
        self.map.get(key).cloned()
    }
}

/// Implements `Serialize` and `Deserialize` for a type through its
/// `to_json(&self) -> Value` and `from_json(&Value) -> Result<Self, String>`.
macro_rules! via_json {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serde::Serialize::serialize(&self.to_json(), serializer)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = <serde_json::Value as serde::Deserialize>::deserialize(deserializer)?;
                <$ty>::from_json(&value).map_err(<D::Error as serde::de::Error>::custom)
            }
        }
    };
}

pub(crate) use via_json;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_checked_like_a_derive_would() {
        let v = json!({"a": "x", "n": 3, "z": null});
        let o = Object::new(&v, "a test object", &["a", "n", "z", "b"]).unwrap();
        assert_eq!(o.str("a").unwrap(), "x");
        assert_eq!(o.u64("n").unwrap(), 3);
        assert_eq!(o.opt_str("z").unwrap(), None);
        assert!(!o.bool_or_false("b").unwrap());
        assert_eq!(o.str("b").unwrap_err(), "missing field `b`");
        assert!(o.str("n").unwrap_err().contains("invalid type for `n`"));
        let e = Object::new(&v, "a test object", &["a"]).err().unwrap();
        assert!(e.starts_with("unknown field `n`"), "{e}");
        assert!(Object::new(&json!([]), "x", &[]).is_err());
    }
}
