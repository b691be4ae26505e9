//! JSON values that keep their objects' keys in the order they came in, and their text as
//! Python's `json.dumps(value, ensure_ascii=False)` writes it.
//!
//! DeepSeek's chat encodings write tool schemas and tool-call arguments into the prompt with
//! Python's `json.dumps`: keys in the client's order, `", "` and `": "` between items. The
//! workspace's `serde_json` maps sort their keys, so the prompt text the model was trained on
//! needs values of their own.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// A JSON value whose objects keep their keys' order.
#[derive(Clone, Debug, PartialEq)]
pub enum JsonValue {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<JsonValue>),
    Object(Vec<(String, JsonValue)>),
}

impl JsonValue {
    /// Parses `text` keeping its objects' key order.
    pub fn parse(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The same value as `serde_json` holds it (keys sorted).
    pub fn to_value(&self) -> Value {
        match self {
            JsonValue::Null => Value::Null,
            JsonValue::Bool(b) => Value::Bool(*b),
            JsonValue::Number(n) => Value::Number(n.clone()),
            JsonValue::String(s) => Value::String(s.clone()),
            JsonValue::Array(items) => Value::Array(items.iter().map(Self::to_value).collect()),
            JsonValue::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }

    /// The value of key `key` of an object (the last, as JSON parsers keep a repeated key's).
    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        match self {
            JsonValue::Object(entries) => {
                entries.iter().rev().find(|(k, _)| k == key).map(|e| &e.1)
            }
            _ => None,
        }
    }

    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Python's `json.dumps(self, ensure_ascii=False)`.
    pub fn python_text(&self) -> String {
        let mut out = String::new();
        self.write_python(&mut out);
        out
    }

    fn write_python(&self, out: &mut String) {
        match self {
            JsonValue::Null => out.push_str("null"),
            JsonValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            JsonValue::Number(n) => out.push_str(&python_number(n)),
            JsonValue::String(s) => out.push_str(&quoted(s)),
            JsonValue::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write_python(out);
                }
                out.push(']');
            }
            JsonValue::Object(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&quoted(k));
                    out.push_str(": ");
                    v.write_python(out);
                }
                out.push('}');
            }
        }
    }
}

/// A string as a JSON literal: Python's escapes under `ensure_ascii=False` are serde_json's
/// (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as `\u00XX`).
pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A number as Python writes the float or int it parses to: integers as they are, floats with
/// a `.0` where Rust would write none, exponents as Python's `repr` (`1e+16`).
fn python_number(n: &Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if !f.is_finite() {
        return n.to_string();
    }
    let abs = f.abs();
    // Python's repr switches to exponents below 1e-4 and from 1e16.
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let text = format!("{f:e}"); // "1e16", "1.5e-5"
        let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let text = f.to_string();
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = JsonValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<JsonValue, D::Error> {
        JsonValue::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<JsonValue, E> {
        Ok(JsonValue::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<JsonValue, E> {
        Ok(JsonValue::Number(n.into()))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<JsonValue, E> {
        Ok(JsonValue::Number(n.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<JsonValue, E> {
        Number::from_f64(f)
            .map(JsonValue::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<JsonValue, E> {
        Ok(JsonValue::String(s.to_string()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<JsonValue, E> {
        Ok(JsonValue::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(JsonValue::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonValue, A::Error> {
        let mut entries: Vec<(String, JsonValue)> = Vec::new();
        // Each key's place in `entries`, so that an object of many keys reads in linear time.
        let mut places: HashMap<String, usize> = HashMap::new();
        while let Some((k, v)) = map.next_entry::<String, JsonValue>()? {
            // A repeated key keeps its first place and its last value, as Python's dict does.
            match places.get(&k) {
                Some(&i) => entries[i].1 = v,
                None => {
                    places.insert(k.clone(), entries.len());
                    entries.push((k, v));
                }
            }
        }
        Ok(JsonValue::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_keep_their_key_order_and_read_as_python_writes_them() {
        let text = r#"{"zeta": 1, "alpha": [true, null, "x\ny"], "mid": {"b": 2.5, "a": -3}}"#;
        let v = JsonValue::parse(text).unwrap();
        assert_eq!(
            v.python_text(),
            r#"{"zeta": 1, "alpha": [true, null, "x\ny"], "mid": {"b": 2.5, "a": -3}}"#
        );
        // serde_json's own value sorts them.
        assert_eq!(
            v.to_value().to_string(),
            r#"{"alpha":[true,null,"x\ny"],"mid":{"a":-3,"b":2.5},"zeta":1}"#
        );
        assert_eq!(
            v.get("mid").and_then(|m| m.get("a")),
            Some(&JsonValue::Number((-3).into()))
        );
    }

    #[test]
    fn non_ascii_stays_as_it_is_and_floats_read_as_python_floats() {
        let v = JsonValue::parse(r#"["杭州", "\u00e9", 2.0, 1e20, 0.00001, 123.25, "\u0001"]"#)
            .unwrap();
        assert_eq!(
            v.python_text(),
            "[\"杭州\", \"é\", 2.0, 1e+20, 1e-05, 123.25, \"\\u0001\"]"
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_place_and_its_last_value() {
        let v = JsonValue::parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(v.python_text(), r#"{"a": 3, "b": 2}"#);
    }

    #[test]
    fn the_object_deserializer_refuses_what_is_not_json() {
        assert!(JsonValue::parse("{\"a\": }").is_err());
        assert!(JsonValue::parse("[1, 2").is_err());
    }
}
