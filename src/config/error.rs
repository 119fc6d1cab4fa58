//! The one error type of configuration: which file (or "request body"),
//! which key (`vm[2].workload.seed`), what is wrong and what is allowed;
//! and the translation of serde's messages into that form.

use std::fmt;

/// A configuration error: which file, which key, what is wrong and allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.file.is_empty(), self.key.is_empty()) {
            (true, true) => write!(f, "{}", self.message),
            (false, true) => write!(f, "{}: {}", self.file, self.message),
            (true, false) => write!(f, "key `{}`: {}", self.key, self.message),
            (false, false) => write!(f, "{}: key `{}`: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// Joins a key path and a key: `vm[0]` + `name` is `vm[0].name`.
pub(crate) fn join(path: &str, key: &str) -> String {
    match (path.is_empty(), key.starts_with('[')) {
        (true, _) => key.to_string(),
        (false, true) => format!("{path}{key}"),
        (false, false) => format!("{path}.{key}"),
    }
}

/// Errors about the keys of one table (`path`) of one file.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub file: &'a str,
    pub path: &'a str,
}

impl<'a> At<'a> {
    pub fn new(file: &'a str, path: &'a str) -> At<'a> {
        At { file, path }
    }

    pub fn key(&self, key: &str) -> String {
        join(self.path, key)
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: self.key(key),
            message: message.into(),
        }
    }

    /// An optional integer in `min..=max`, else "N is out of range;
    /// allowed: `allowed`".
    pub fn int_in(
        &self,
        key: &str,
        value: Option<i64>,
        min: u64,
        max: u64,
        allowed: &str,
    ) -> Result<Option<u64>> {
        match value {
            None => Ok(None),
            Some(i) if i >= 0 && (min..=max).contains(&(i as u64)) => Ok(Some(i as u64)),
            Some(i) => Err(self.error(key, format!("{i} is out of range; allowed: {allowed}"))),
        }
    }

    /// [`int_in`](Self::int_in) with "`min` to `max`" as what is allowed.
    pub fn int(&self, key: &str, value: Option<i64>, min: u64, max: u64) -> Result<Option<u64>> {
        self.int_in(key, value, min, max, &format!("{min} to {max}"))
    }

    /// An optional number in `min..=max` (NaN is out of range).
    pub fn float(&self, key: &str, value: Option<f64>, min: f64, max: f64) -> Result<Option<f64>> {
        match value {
            Some(v) if !(min..=max).contains(&v) => {
                Err(self.error(key, format!("{v} is out of range; allowed: {min} to {max}")))
            }
            v => Ok(v),
        }
    }
}

/// A serde error at `path` (from `serde_path_to_error`) as a
/// [`ConfigError`] of `file`, in the words of the rest of the config
/// errors: the key in full, what was found and what is allowed.
pub(crate) fn from_serde<E: fmt::Display>(
    file: &str,
    prefix: &str,
    e: serde_path_to_error::Error<E>,
) -> ConfigError {
    use serde_path_to_error::Segment;
    let mut key = prefix.to_string();
    for segment in e.path().iter() {
        key = match segment {
            Segment::Seq { index } => format!("{key}[{index}]"),
            Segment::Map { key: k } => join(&key, k),
            Segment::Enum { variant } => join(&key, variant),
            Segment::Unknown => key,
        };
    }
    let raw = e.inner().to_string();
    // toml's messages add a line "in `key`" (the key is named already).
    let raw = raw.lines().next().unwrap_or("").trim_end();
    let (key, message) = translate(key, raw);
    ConfigError {
        file: file.to_string(),
        key,
        message,
    }
}

/// serde's standard messages (see `serde::de::Error`'s provided methods),
/// reworded; anything else is kept as it is.
fn translate(key: String, raw: &str) -> (String, String) {
    if let Some(rest) = raw.strip_prefix("unknown field `") {
        // "unknown field `x`, expected one of `a`, `b`" / "expected `a`" /
        // "there are no fields"
        let allowed = rest.split_once(", ").map_or("", |(_, a)| a);
        let mut names: Vec<&str> = allowed
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|n| !n.is_empty())
            .collect();
        names.sort_unstable();
        let allowed = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        };
        return (key, format!("unknown key; allowed here: {allowed}"));
    }
    if let Some(rest) = raw.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        return (join(&key, field), "is required".to_string());
    }
    if let Some(rest) = raw.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return (
                key,
                format!(
                    "expected {}, found {}",
                    expected_kind(expected),
                    found_kind(found)
                ),
            );
        }
    }
    if let Some(rest) = raw.strip_prefix("invalid value: integer `") {
        // An integer beyond its type's range (a negative count, or one
        // beyond 2^63 in JSON).
        if let Some((n, _)) = rest.split_once('`') {
            return (
                key,
                format!("{n} is out of range; allowed: an integer of 0 or more"),
            );
        }
    }
    (key, raw.to_string())
}

/// What a value of serde's `expected` description is, in config words.
fn expected_kind(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" => {
            "an integer".into()
        }
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "an array".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e => e.to_string(),
    }
}

/// What serde's `Unexpected` found, in config words ("a string").
fn found_kind(found: &str) -> &'static str {
    let word = found.split([' ', '`']).next().unwrap_or("");
    match word {
        "string" | "character" => "a string",
        "integer" => "an integer",
        "floating" => "a float",
        "boolean" => "a boolean",
        "sequence" => "an array",
        "map" => "a table",
        "unit" | "Option" => "null",
        _ => "a value of another type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_become_config_messages() {
        let t = |raw: &str| translate("vm[0]".into(), raw);
        assert_eq!(
            t("unknown field `vcpu`, expected one of `vcpus`, `name`"),
            (
                "vm[0]".into(),
                "unknown key; allowed here: name, vcpus".into()
            )
        );
        assert_eq!(
            t("missing field `kind`"),
            ("vm[0].kind".into(), "is required".into())
        );
        assert_eq!(
            t("invalid type: string \"two\", expected i64").1,
            "expected an integer, found a string"
        );
        assert_eq!(
            t("invalid type: integer `1`, expected a boolean").1,
            "expected true or false, found an integer"
        );
        assert_eq!(
            t("invalid type: sequence, expected struct WorkloadSpec").1,
            "expected a table, found an array"
        );
        assert_eq!(
            t("invalid value: integer `-1`, expected u64").1,
            "-1 is out of range; allowed: an integer of 0 or more"
        );
        assert_eq!(t("something else").1, "something else");
    }
}
