//! Scenario files: the TOML that parameterises one benchmark scenario.
//!
//! ```toml
//! kind = "density"            # which code runs it (see `disco bench list`)
//! description = "..."         # optional, shown in the report
//! seeds = [7]                 # the scenario runs once per seed; figures pool over them
//! vms = 100
//! memory_mib = 4
//! reps = 3
//!
//! [quick]                     # overrides for --quick (any key above but kind)
//! reps = 1
//! ```
//!
//! A scenario's code reads its keys through [`Params`], which records every
//! key asked for; [`Params::finish`] then rejects any other key, naming the
//! file, the key and the keys allowed. Values from `[quick]` are named
//! `quick.KEY` in errors, values from `--set KEY=VALUE` `--set KEY`. Every
//! error has the form of `disco check`'s (`src/config.rs`):
//! `FILE: key `KEY`: what is wrong; allowed: ...`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A scenario file error: which file, which key, what is wrong and allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.file, self.key, self.message)
        }
    }
}

impl std::error::Error for ParamError {}

pub type ParamResult<T> = std::result::Result<T, ParamError>;

/// Keys every scenario file may have, whatever its kind.
pub const COMMON_KEYS: &[&str] = &["kind", "name", "description", "seeds", "quick"];

/// Where a value came from, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    File,
    Quick,
    Set,
}

/// The parameters of one scenario file, with `[quick]` (in quick mode) and
/// `--set` overrides applied.
#[derive(Debug)]
pub struct Params {
    file: String,
    name: String,
    kind: String,
    description: String,
    quick: bool,
    values: BTreeMap<String, (toml::Value, Origin)>,
    /// Keys the file itself has (the `[quick]` table's keys must be among
    /// the kind's keys too).
    quick_keys: BTreeSet<String>,
    used: RefCell<BTreeSet<String>>,
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

impl Params {
    /// Parses scenario `text`; `file` names it in errors and gives the
    /// scenario's default name (its stem). `overrides` are `KEY=VALUE`
    /// strings (TOML values; a bare word is taken as a string).
    pub fn parse(text: &str, file: &str, quick: bool, overrides: &[String]) -> ParamResult<Params> {
        let err = |key: &str, message: String| ParamError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err("", format!("not valid TOML: {}", e.to_string().trim_end()))
        })?;
        let stem = std::path::Path::new(file.strip_prefix("shipped:").unwrap_or(file))
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("scenario")
            .to_string();
        let mut values = BTreeMap::new();
        let mut quick_keys = BTreeSet::new();
        let mut quick_table = None;
        for (k, v) in root {
            if k == "quick" {
                match v {
                    toml::Value::Table(t) => quick_table = Some(t),
                    other => {
                        return Err(err(
                            "quick",
                            format!(
                                "expected a table of overrides for --quick, found a {}",
                                type_name(&other)
                            ),
                        ))
                    }
                }
            } else {
                values.insert(k, (v, Origin::File));
            }
        }
        if let Some(t) = quick_table {
            for (k, v) in t {
                if k == "kind" || k == "quick" {
                    return Err(err(
                        &format!("quick.{k}"),
                        "cannot be overridden in [quick]; allowed there: the scenario's other keys"
                            .into(),
                    ));
                }
                quick_keys.insert(k.clone());
                if quick {
                    values.insert(k, (v, Origin::Quick));
                }
            }
        }
        for o in overrides {
            let Some((k, v)) = o.split_once('=') else {
                return Err(err(
                    "",
                    format!("--set {o:?}: expected KEY=VALUE (e.g. --set vms=4)"),
                ));
            };
            let (k, v) = (k.trim(), v.trim());
            if k == "kind" {
                return Err(err("--set kind", "cannot be overridden".into()));
            }
            let value = match format!("x = {v}").parse::<toml::Table>() {
                Ok(mut t) => t.remove("x").expect("parsed one key"),
                Err(_) => toml::Value::String(v.to_string()),
            };
            values.insert(k.to_string(), (value, Origin::Set));
        }
        let kind = match values.get("kind") {
            Some((toml::Value::String(s), _)) => s.clone(),
            Some((other, _)) => {
                return Err(err(
                    "kind",
                    format!("expected a string, found a {}", type_name(other)),
                ))
            }
            None => {
                return Err(err(
                    "kind",
                    "is required (the scenario kind, e.g. kind = \"density\")".into(),
                ))
            }
        };
        let p = Params {
            file: file.to_string(),
            name: stem,
            kind,
            description: String::new(),
            quick,
            values,
            quick_keys,
            used: RefCell::new(COMMON_KEYS.iter().map(|s| s.to_string()).collect()),
        };
        let name = p.opt_str("name")?.unwrap_or(&p.name).to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(p.error(
                "name",
                format!("`{name}` is not a valid scenario name; allowed: a-z, A-Z, 0-9, '-' and '_' (it names the result files)"),
            ));
        }
        let description = p.opt_str("description")?.unwrap_or("").to_string();
        Ok(Params {
            name,
            description,
            ..p
        })
    }

    pub fn file(&self) -> &str {
        &self.file
    }
    /// The scenario's name: the `name` key or the file's stem.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn kind(&self) -> &str {
        &self.kind
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn quick(&self) -> bool {
        self.quick
    }

    /// Every value in effect (after overrides), as JSON, for the result.
    pub fn to_json(&self) -> serde_json::Value {
        let t: toml::Table = self
            .values
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        serde_json::to_value(t).unwrap_or(serde_json::Value::Null)
    }

    /// The key as named in errors (`quick.vms`, `--set vms`, `vms`).
    fn key_name(&self, key: &str) -> String {
        match self.values.get(key).map(|(_, o)| *o) {
            Some(Origin::Quick) => format!("quick.{key}"),
            Some(Origin::Set) => format!("--set {key}"),
            _ => key.to_string(),
        }
    }

    /// An error about `key`.
    pub fn error(&self, key: &str, message: String) -> ParamError {
        ParamError {
            file: self.file.clone(),
            key: self.key_name(key),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&toml::Value> {
        self.used.borrow_mut().insert(key.to_string());
        self.values.get(key).map(|(v, _)| v)
    }

    fn type_error(&self, key: &str, expected: &str, found: &toml::Value) -> ParamError {
        self.error(
            key,
            format!("expected {expected}, found a {}", type_name(found)),
        )
    }

    pub fn opt_str(&self, key: &str) -> ParamResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    /// A string from `allowed`.
    pub fn choice(&self, key: &str, allowed: &[&str], default: &str) -> ParamResult<String> {
        let v = self.opt_str(key)?.unwrap_or(default);
        if allowed.contains(&v) {
            Ok(v.to_string())
        } else {
            Err(self.error(
                key,
                format!("`{v}` is not allowed; allowed: {}", allowed.join(", ")),
            ))
        }
    }

    fn int_in(&self, key: &str, v: &toml::Value, min: u64, max: u64) -> ParamResult<u64> {
        match v {
            toml::Value::Integer(i) if *i >= 0 && (*i as u64) >= min && (*i as u64) <= max => {
                Ok(*i as u64)
            }
            toml::Value::Integer(i) => {
                Err(self.error(key, format!("{i} is out of range; allowed: {min} to {max}")))
            }
            other => Err(self.type_error(key, &format!("an integer ({min} to {max})"), other)),
        }
    }

    pub fn u64(&self, key: &str, min: u64, max: u64, default: u64) -> ParamResult<u64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => self.int_in(key, v, min, max),
        }
    }

    pub fn usize(&self, key: &str, min: usize, max: usize, default: usize) -> ParamResult<usize> {
        Ok(self.u64(key, min as u64, max as u64, default as u64)? as usize)
    }

    /// A number (integer or float) in `[min, max]`.
    pub fn f64(&self, key: &str, min: f64, max: f64, default: f64) -> ParamResult<f64> {
        let v = match self.get(key) {
            None => return Ok(default),
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(other) => {
                return Err(self.type_error(key, &format!("a number ({min} to {max})"), other))
            }
        };
        if v.is_finite() && v >= min && v <= max {
            Ok(v)
        } else {
            Err(self.error(key, format!("{v} is out of range; allowed: {min} to {max}")))
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> ParamResult<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.type_error(key, "true or false", v)),
        }
    }

    /// A non-empty list of strings, each from `allowed` when given.
    pub fn str_list(
        &self,
        key: &str,
        allowed: Option<&[&str]>,
        default: &[&str],
    ) -> ParamResult<Vec<String>> {
        let list = match self.get(key) {
            None => return Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(toml::Value::Array(a)) => a,
            Some(v) => return Err(self.type_error(key, "a list of strings", v)),
        };
        if list.is_empty() {
            return Err(self.error(key, "is empty; give at least one value".into()));
        }
        let mut out = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let toml::Value::String(s) = v else {
                return Err(self.type_error(&format!("{key}[{i}]"), "a string", v));
            };
            if let Some(allowed) = allowed {
                if !allowed.contains(&s.as_str()) {
                    return Err(self.error(
                        key,
                        format!("`{s}` is not allowed; allowed: {}", allowed.join(", ")),
                    ));
                }
            }
            out.push(s.clone());
        }
        Ok(out)
    }

    /// A non-empty list of integers in `[min, max]`.
    pub fn u64_list(
        &self,
        key: &str,
        min: u64,
        max: u64,
        default: &[u64],
    ) -> ParamResult<Vec<u64>> {
        let list = match self.get(key) {
            None => return Ok(default.to_vec()),
            Some(toml::Value::Array(a)) => a,
            Some(v) => {
                return Err(self.type_error(
                    key,
                    &format!("a list of integers ({min} to {max})"),
                    v,
                ))
            }
        };
        if list.is_empty() {
            return Err(self.error(key, "is empty; give at least one value".into()));
        }
        list.iter().map(|v| self.int_in(key, v, min, max)).collect()
    }

    /// `seeds`: the scenario runs once per seed.
    pub fn seeds(&self, default: &[u64]) -> ParamResult<Vec<u64>> {
        let seeds = self.u64_list("seeds", 0, i64::MAX as u64, default)?;
        let distinct: BTreeSet<_> = seeds.iter().collect();
        if distinct.len() != seeds.len() {
            return Err(self.error(
                "seeds",
                "lists a seed twice; allowed: distinct seeds".into(),
            ));
        }
        Ok(seeds)
    }

    /// A shipped policy name or a path to a policy `.toml` file.
    pub fn policy(&self, key: &str, default: &str) -> ParamResult<String> {
        let v = self.opt_str(key)?.unwrap_or(default).to_string();
        self.check_policy(key, &v)?;
        Ok(v)
    }

    /// A list of policies (see [`Params::policy`]).
    pub fn policies(&self, key: &str, default: &[&str]) -> ParamResult<Vec<String>> {
        let list = self.str_list(key, None, default)?;
        for p in &list {
            self.check_policy(key, p)?;
        }
        Ok(list)
    }

    fn check_policy(&self, key: &str, v: &str) -> ParamResult<()> {
        let shipped: Vec<&str> = crate::config::SHIPPED_POLICIES
            .iter()
            .map(|(n, _)| *n)
            .collect();
        if shipped.contains(&v) || v.ends_with(".toml") {
            Ok(())
        } else {
            Err(self.error(
                key,
                format!(
                    "`{v}` is not a policy; allowed: a shipped policy ({}) or a path to a .toml file",
                    shipped.join(", ")
                ),
            ))
        }
    }

    /// `host`, a shipped topology fixture, or a path to an hwloc XML file.
    /// A shmem folio size the host is to allow for the run, kB (`0`: leave
    /// the host as it is; else a power of two from 16 to 2048).
    pub fn folio_kib(&self, key: &str) -> ParamResult<u32> {
        let kib = self.u64(key, 0, 2048, 0)? as u32;
        if kib != 0 && (kib < 16 || !kib.is_power_of_two()) {
            return Err(self.error(
                key,
                format!(
                    "{kib} is not a folio size; allowed: 0 (leave the host as it is) or 16, 32, \
                     64, 128, 256, 512, 1024, 2048"
                ),
            ));
        }
        Ok(kib)
    }

    pub fn topology(&self, key: &str, default: &str) -> ParamResult<String> {
        let v = self.opt_str(key)?.unwrap_or(default).to_string();
        let fixtures = crate::topology::Topology::fixture_names();
        if v == "host" || fixtures.contains(&v.as_str()) || v.ends_with(".xml") {
            Ok(v)
        } else {
            Err(self.error(
                key,
                format!(
                    "`{v}` is not a topology; allowed: \"host\", a shipped fixture ({}), or a path to an hwloc XML file ending in .xml",
                    fixtures.join(", ")
                ),
            ))
        }
    }

    /// A TOML inline table, returned as TOML text (e.g. a `workload`).
    pub fn opt_table_text(&self, key: &str) -> ParamResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ toml::Value::Table(_)) => Ok(Some(v.to_string())),
            Some(v) => Err(self.type_error(key, "a table, e.g. { kind = \"fill\", seed = 7 }", v)),
        }
    }

    /// Rejects every key the scenario's code did not ask for, also in
    /// `[quick]` (even when not in quick mode).
    pub fn finish(&self) -> ParamResult<()> {
        let used = self.used.borrow();
        let allowed = || used.iter().cloned().collect::<Vec<_>>().join(", ");
        for k in self.values.keys() {
            if !used.contains(k) {
                return Err(self.error(
                    k,
                    format!(
                        "unknown key for a scenario of kind `{}`; allowed: {}",
                        self.kind,
                        allowed()
                    ),
                ));
            }
        }
        for k in &self.quick_keys {
            if !used.contains(k) {
                return Err(ParamError {
                    file: self.file.clone(),
                    key: format!("quick.{k}"),
                    message: format!(
                        "unknown key for a scenario of kind `{}`; allowed: {}",
                        self.kind,
                        allowed()
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "kind = \"density\"\nvms = 100\nseeds = [7]\n[quick]\nvms = 10\n";

    #[test]
    fn quick_and_set_override() {
        let p = Params::parse(TEXT, "d.toml", false, &[]).unwrap();
        assert_eq!((p.name(), p.kind()), ("d", "density"));
        assert_eq!(p.u64("vms", 1, 1000, 1).unwrap(), 100);
        let q = Params::parse(TEXT, "d.toml", true, &[]).unwrap();
        assert_eq!(q.u64("vms", 1, 1000, 1).unwrap(), 10);
        let s = Params::parse(TEXT, "d.toml", true, &["vms=3".into()]).unwrap();
        assert_eq!(s.u64("vms", 1, 1000, 1).unwrap(), 3);
        assert_eq!(s.seeds(&[1]).unwrap(), vec![7]);
        s.finish().unwrap();
    }

    #[test]
    fn errors_name_file_key_and_allowed() {
        let q = Params::parse(TEXT, "d.toml", true, &[]).unwrap();
        let e = q.u64("vms", 20, 1000, 1).unwrap_err().to_string();
        assert_eq!(
            e,
            "d.toml: key `quick.vms`: 10 is out of range; allowed: 20 to 1000"
        );
        let p = Params::parse("kind = \"x\"\nvmz = 1\n", "x.toml", false, &[]).unwrap();
        p.u64("vms", 1, 10, 1).unwrap();
        let e = p.finish().unwrap_err().to_string();
        assert!(e.starts_with("x.toml: key `vmz`: unknown key"), "{e}");
        assert!(e.contains("allowed: ") && e.contains("vms"), "{e}");
        let e = Params::parse("vms = 1\n", "y.toml", false, &[]).unwrap_err();
        assert_eq!(e.key, "kind");
        let e = Params::parse("kind = \"x\"\n[quick]\nvmz = 1\n", "z.toml", false, &[])
            .unwrap()
            .finish()
            .unwrap_err();
        assert_eq!(e.key, "quick.vmz");
        let p = Params::parse("kind = \"x\"\npolicy = \"fast\"\n", "p.toml", false, &[]).unwrap();
        let e = p.policy("policy", "static").unwrap_err().to_string();
        assert!(
            e.contains("allowed: a shipped policy (disco, static"),
            "{e}"
        );
    }
}
