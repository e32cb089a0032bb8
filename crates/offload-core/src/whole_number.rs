//! Reading a request's integer fields as JSON Schema reads `integer`: any
//! number with no fraction, so `4.0` and `1e3` are 4 and 1000. JSON has one
//! kind of number, and a client computing a delay in floating point (Python
//! writes `4.0`) sends what the OpenAPI document calls an integer.

use std::fmt;

use serde::Deserializer;
use serde::de::{Error, Unexpected, Visitor};

/// An optional integer field: absent or `null` is `None`.
pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(WholeNumber)
}

/// An integer field whose `null` differs from its absence (`Some(None)`).
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    option(d).map(Some)
}

/// An integer from a JSON number with no fraction.
pub fn from_f64<E: Error>(v: f64) -> Result<i64, E> {
    // 2^63 is exact as an f64; every f64 below it with no fraction fits.
    const TOO_LARGE: f64 = 9_223_372_036_854_775_808.0;
    if v.fract() != 0.0 {
        Err(E::invalid_type(Unexpected::Float(v), &"an integer"))
    } else if (-TOO_LARGE..TOO_LARGE).contains(&v) {
        Ok(v as i64)
    } else {
        Err(E::invalid_value(
            Unexpected::Float(v),
            &"an integer below 2^63",
        ))
    }
}

struct WholeNumber;

impl<'de> Visitor<'de> for WholeNumber {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        option(d)
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
        i64::try_from(v)
            .map(Some)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &"an integer below 2^63"))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Self::Value, E> {
        from_f64(v).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "super::option")]
        n: Option<i64>,
    }

    fn read(text: &str) -> Result<Option<i64>, String> {
        serde_json::from_str::<Body>(text)
            .map(|b| b.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_without_a_fraction_are_integers() {
        assert_eq!(read(r#"{"n": 4}"#), Ok(Some(4)));
        assert_eq!(read(r#"{"n": -4}"#), Ok(Some(-4)));
        assert_eq!(read(r#"{"n": 4.0}"#), Ok(Some(4)));
        assert_eq!(read(r#"{"n": 1e3}"#), Ok(Some(1000)));
        assert_eq!(read(r#"{"n": -0.0}"#), Ok(Some(0)));
        assert_eq!(read(r#"{"n": null}"#), Ok(None));
        assert_eq!(read(r#"{}"#), Ok(None));
        assert_eq!(read(r#"{"n": 9223372036854775807}"#), Ok(Some(i64::MAX)));
    }

    #[test]
    fn fractions_and_what_no_i64_holds_are_refused_saying_so() {
        let refused = |text: &str| read(text).expect_err(text);
        assert!(
            refused(r#"{"n": 4.5}"#)
                .starts_with("invalid type: floating point `4.5`, expected an integer")
        );
        assert!(
            refused(r#"{"n": "4"}"#).starts_with("invalid type: string \"4\", expected an integer")
        );
        assert!(
            refused(r#"{"n": 9223372036854775808}"#).contains("expected an integer below 2^63")
        );
        assert!(refused(r#"{"n": 1e19}"#).contains("expected an integer below 2^63"));
        assert!(refused(r#"{"n": true}"#).contains("expected an integer"));
    }
}
