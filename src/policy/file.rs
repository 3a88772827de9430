//! The file format: TOML read into the [model](super::Policy), every error placed at its line
//! and named by its field.

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};

use super::{Policy, PolicyError};

impl Policy {
    /// Reads a policy from TOML text and [validates](Policy::validate) it. An error names the
    /// line, the column and the field at fault.
    ///
    /// ```
    /// use tower_reserve::policy::Policy;
    ///
    /// let err = Policy::from_toml("[[route]]\nmethod = \"POST\"\npath = \"/a\"\nshadow = \"yes\"\n")
    ///     .unwrap_err();
    /// assert_eq!((err.line(), err.field()), (Some(4), Some("route[0].shadow")));
    /// ```
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let document = DeTable::parse(text).map_err(|e| from_toml_error(text, &[], &e))?;
        let mut fields = Vec::new();
        walk(document.get_ref(), "", &mut fields);
        let policy: Policy =
            toml::from_str(text).map_err(|e| from_toml_error(text, &fields, &e))?;
        policy.validate().map_err(|e| place(text, &fields, e))?;
        Ok(policy)
    }

    /// Reads a policy file; see [`Policy::from_toml`].
    pub fn load(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyError::new(format!(
                "cannot read the policy file {}: {e}",
                path.display()
            ))
        })?;
        Policy::from_toml(&text)
    }
}

/// A field of the document: its path (`route[0].budget[1].key`), where its key and its value
/// are.
struct Field {
    path: String,
    key: Option<Range<usize>>,
    value: Range<usize>,
}

fn walk(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Field>) {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        out.push(Field {
            path: path.clone(),
            key: Some(key.span()),
            value: value.span(),
        });
        descend(value.get_ref(), &path, out);
    }
}

fn descend(value: &DeValue<'_>, path: &str, out: &mut Vec<Field>) {
    match value {
        DeValue::Table(table) => walk(table, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Field {
                    path: path.clone(),
                    key: None,
                    value: item.span(),
                });
                descend(item.get_ref(), &path, out);
            }
        }
        _ => {}
    }
}

fn contains(range: &Range<usize>, at: usize) -> bool {
    range.start <= at && at < range.end.max(range.start + 1)
}

/// The innermost field whose key or value holds `at`. Fields come parents first, and an item of
/// an array of tables spans its header as the array does: of equal spans, the last is innermost.
fn field_at(fields: &[Field], at: usize) -> Option<&Field> {
    fields
        .iter()
        .rev()
        .filter(|f| contains(&f.value, at) || f.key.as_ref().is_some_and(|k| contains(k, at)))
        .min_by_key(|f| f.value.len())
}

/// A TOML or type error, at its span.
fn from_toml_error(text: &str, fields: &[Field], err: &toml::de::Error) -> PolicyError {
    let message = err.message().trim().to_owned();
    let Some(span) = err.span() else {
        return PolicyError::new(message);
    };
    let (line, column) = position(text, span.start);
    PolicyError::new(message)
        .with_field(field_at(fields, span.start).map(|f| f.path.clone()))
        .with_position(line, column)
}

/// A validation error, at the value of the field it names.
fn place(text: &str, fields: &[Field], err: PolicyError) -> PolicyError {
    let found = err
        .field()
        .and_then(|path| fields.iter().find(|f| f.path == path));
    match found {
        Some(field) => {
            let (line, column) = position(text, field.value.start);
            err.with_position(line, column)
        }
        None => err,
    }
}

/// The line and column (from 1; the column in characters) of byte `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
