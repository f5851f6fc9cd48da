//! Configuration: read a TOML file, check it, and resolve it into a [`Config`].
//!
//! Two stages, as ripgrep does with its flags: the private module `file` mirrors the file
//! for serde, then `resolve` validates every value and produces the plain, typed [`Config`]
//! (its types live in `types` and are re-exported here) that the rest of Tether uses.
//! Every error carries the file, line and column of the offending key or value and says
//! what was expected; all errors of a file are reported at once. Only this module knows
//! TOML. It does not open sockets or resolve names beyond `host:port` lookups.

mod file;
mod resolve;
mod types;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

pub use types::*;

// === errors ===

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub errors: Vec<Located>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.line == 0 {
                write!(f, "{}: {}", self.file, e.message)?;
            } else {
                write!(f, "{}:{}:{}: {}", self.file, e.line, e.column, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === loading ===

/// Reads and resolves a config file.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        errors: vec![Located { line: 0, column: 0, message: format!("cannot read: {e}") }],
    })?;
    parse(&src, &file)
}

/// Parses and resolves config text; `file` is only used in error messages.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let parsed: file::File = from_toml(src, file)?;
    resolve::resolve(src, &parsed).map_err(|errors| ConfigError { file: file.to_string(), errors })
}

/// Deserializes TOML text with the located errors of [`parse`]: for the files Tether reads
/// besides its config (the simulator's scenarios), so they report errors the same way.
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(src: &str, file: &str) -> Result<T, ConfigError> {
    toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().trim().to_string();
        if let Some(key) = key_at(src, span.start) {
            if !message.contains(&key) {
                message = format!("key `{key}`: {message}");
            }
        }
        ConfigError { file: file.to_string(), errors: vec![locate(src, span, message)] }
    })
}

/// The key written on the line of `offset`, if that line reads `key = ...`, so that serde's
/// type errors (which carry only a span) can name the key too.
fn key_at(src: &str, offset: usize) -> Option<String> {
    let start = src[..offset.min(src.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = src[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_start_matches('{').trim();
    let ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    ok.then(|| key.to_string())
}

/// The line and column of `span`'s start in `src`, with `message`.
pub(crate) fn locate(src: &str, span: Range<usize>, message: String) -> Located {
    let offset = span.start.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    Located { line, column, message }
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `12h` or `1d`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let expected = || {
        format!("\"{s}\" is not a duration: expected a number and a unit, like \"500ms\", \"30s\", \"5m\", \"12h\" or \"1d\"")
    };
    let n: u64 = digits.parse().map_err(|_| expected())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(expected()),
    };
    Ok(d)
}

#[cfg(test)]
mod tests;
