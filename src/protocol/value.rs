//! Column values on the wire.
//!
//! The wire form is plain JSON scalars: `null`, booleans, integers, floats and
//! strings. Which of them a column accepts, and what a string must look like
//! (decimal digits, ISO 8601, base64, ...), is decided by the column's
//! [`ColumnType`](super::schema::ColumnType); see `docs/protocol.md` and
//! [`crate::pgtext`]. Keeping the value itself untyped makes batches compact
//! and keeps one decoder for every table.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Finite floats only; NaN and infinities travel as `Text`.
    Float(f64),
    Text(String),
}

impl Value {
    /// Rough size on the wire, used to bound batches in bytes without
    /// serializing twice.
    pub fn wire_size(&self) -> usize {
        match self {
            Value::Null => 4,
            Value::Bool(_) => 5,
            Value::Int(_) => 20,
            Value::Float(_) => 24,
            // Quotes plus escaping slack; exactness is not needed.
            Value::Text(s) => s.len() + s.len() / 16 + 2,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) if f.is_nan() => s.serialize_str("NaN"),
            Value::Float(f) if *f > 0.0 => s.serialize_str("Infinity"),
            Value::Float(_) => s.serialize_str("-Infinity"),
            Value::Text(t) => s.serialize_str(t),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("null, a boolean, a number or a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format!("integer {v} is larger than a 64-bit signed integer")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// A primary-key value: one value per key column, in key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(pub Vec<Value>);

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Compact JSON, cut short: keys show up in logs and error messages.
        let json = serde_json::to_string(&self.0).unwrap_or_default();
        if json.len() > 200 {
            let mut end = 200;
            while !json.is_char_boundary(end) {
                end -= 1;
            }
            write!(f, "{}…", &json[..end])
        } else {
            f.write_str(&json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip() {
        let vals = vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::Float(1.5),
            Value::Text("ä\"\n".into()),
        ];
        let json = serde_json::to_string(&vals).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Value>>(&json).unwrap(), vals);
    }

    #[test]
    fn non_finite_floats_travel_as_text() {
        assert_eq!(serde_json::to_string(&Value::Float(f64::NAN)).unwrap(), "\"NaN\"");
        assert_eq!(serde_json::to_string(&Value::Float(f64::NEG_INFINITY)).unwrap(), "\"-Infinity\"");
    }

    #[test]
    fn nested_and_oversized_values_are_refused() {
        assert!(serde_json::from_str::<Value>("[1]").is_err());
        assert!(serde_json::from_str::<Value>("{\"a\":1}").is_err());
        assert!(serde_json::from_str::<Value>("18446744073709551615").is_err());
    }

    #[test]
    fn json_numbers_parse_to_the_nearest_double_and_survive_a_round_trip() {
        // Found by the json_batch fuzz target (seed
        // fuzz/seeds/json_batch/crash-float-one-ulp-off.json): without
        // serde_json's float_roundtrip this parsed one unit in the last
        // place off, and its own output parsed to yet another number.
        let text = "444444444444444000000000000000000000000000000000000000000000000000000000000000000000000000000000000000854577294";
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v, Value::Float(text.parse::<f64>().unwrap()), "the nearest double, as Rust's own parser finds it");
        let again: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(again, v);
    }

    #[test]
    fn long_keys_are_shortened_for_display() {
        let k = Key(vec![Value::Text("x".repeat(1000))]);
        assert!(k.to_string().len() < 220);
    }
}
