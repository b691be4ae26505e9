//! `costPerHour`: a positive decimal, written as a string ("31.50") or a whole number (31).
//!
//! Kubernetes structural schemas cannot say "number or string", so the field is
//! `x-kubernetes-int-or-string` (the convention of `resource.Quantity`) and a CEL rule checks
//! the text. Fractional prices must be quoted in YAML; a bare `31.5` is a float and the API
//! server rejects it as neither integer nor string.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The CEL rule on `costPerHour` (also applied by [`CostPerHour::parse`]).
pub const COST_RULE: &str =
    "string(self).matches('^([0-9]*[1-9][0-9]*([.][0-9]+)?|[0-9]+[.][0-9]*[1-9][0-9]*)$')";
/// Its message.
pub const COST_MESSAGE: &str = "variants[].costPerHour must be a positive decimal such as \"31.50\" (quote fractional values) or a whole number such as 31";

/// A price per hour. Keeps the user's text so that it round-trips unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct CostPerHour {
    text: String,
    value: f64,
}

impl CostPerHour {
    /// Parses a positive decimal (`31`, `31.50`, `0.8`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (int_part, frac_part) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let well_formed = digits(int_part) && frac_part.is_none_or(digits);
        let value: f64 = text.parse().unwrap_or(0.0);
        if !well_formed || value <= 0.0 || !value.is_finite() {
            return Err(format!("{COST_MESSAGE}; got {text:?}"));
        }
        Ok(Self {
            text: text.to_string(),
            value,
        })
    }

    /// The price as a number.
    pub fn value(&self) -> f64 {
        self.value
    }
}

impl fmt::Display for CostPerHour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for CostPerHour {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.text.parse::<u64>() {
            Ok(whole) => serializer.serialize_u64(whole),
            Err(_) => serializer.serialize_str(&self.text),
        }
    }
}

impl<'de> Deserialize<'de> for CostPerHour {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Whole(u64),
            Signed(i64),
            Text(String),
            Float(f64),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Whole(n) => n.to_string(),
            Raw::Signed(n) => n.to_string(),
            Raw::Text(s) => s,
            Raw::Float(x) => {
                return Err(serde::de::Error::custom(format!(
                    "{COST_MESSAGE}; got the bare number {x}, write \"{x}\""
                )));
            }
        };
        CostPerHour::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for CostPerHour {
    fn schema_name() -> Cow<'static, str> {
        "CostPerHour".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Price of one replica per hour: a positive decimal string (\"31.50\") or whole number.",
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": 32,
            "x-kubernetes-validations": [{"rule": COST_RULE, "message": COST_MESSAGE}]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_positive_decimals_and_whole_numbers() {
        for ok in ["31", "31.50", "0.8", "007.25"] {
            let cost = CostPerHour::parse(ok).unwrap();
            assert_eq!(cost.to_string(), ok);
            assert!(cost.value() > 0.0);
        }
        let from_int: CostPerHour = serde_json::from_str("12").unwrap();
        assert_eq!(from_int.value(), 12.0);
        assert_eq!(serde_json::to_string(&from_int).unwrap(), "12");
        let from_text: CostPerHour = serde_json::from_str("\"2.75\"").unwrap();
        assert_eq!(serde_json::to_string(&from_text).unwrap(), "\"2.75\"");
    }

    #[test]
    fn rejects_zero_negative_malformed_and_bare_floats() {
        for bad in ["0", "0.00", "-3", "3.", ".5", "1e3", "abc", "", "3.5.1"] {
            let err = CostPerHour::parse(bad).unwrap_err();
            assert!(err.contains("costPerHour"), "{bad}: {err}");
        }
        let err = serde_json::from_str::<CostPerHour>("31.5").unwrap_err();
        assert!(err.to_string().contains("write \"31.5\""), "{err}");
        assert!(serde_json::from_str::<CostPerHour>("-2").is_err());
    }
}
