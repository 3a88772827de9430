//! The one error of a policy that cannot be used: where it is, and what is wrong.

use std::fmt;

/// A policy that was refused: a file that is not TOML, a field of the wrong type, a value out of
/// range, a reference to a table or a path parameter that does not exist.
///
/// It names the field by its path in the policy (`route[0].budget[1].amount`; arrays count from
/// 0) and, for a policy read from a file, the line and column where the field is.
///
/// ```
/// use tower_reserve::policy::Policy;
///
/// let text = "[[route]]\nmethod = \"POST\"\npath = \"/a/{id}\"\n\n[[route.budget]]\nkey = \"{path.nope}\"\namount = 1\nlimit = 10\n";
/// let err = Policy::from_toml(text).unwrap_err();
/// assert_eq!(err.line(), Some(6));
/// assert_eq!(err.field(), Some("route[0].budget[0].key"));
/// assert!(err.to_string().starts_with("line 6, column 7, route[0].budget[0].key: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    field: Option<String>,
    position: Option<(usize, usize)>,
    message: String,
}

impl PolicyError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            field: None,
            position: None,
            message: message.into(),
        }
    }

    /// An error in `field` (a path such as `route[0].lease`).
    pub(crate) fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            position: None,
            message: message.into(),
        }
    }

    pub(crate) fn with_field(mut self, field: Option<String>) -> Self {
        if self.field.is_none() {
            self.field = field;
        }
        self
    }

    pub(crate) fn with_position(mut self, line: usize, column: usize) -> Self {
        self.position = Some((line, column));
        self
    }

    /// The path of the field at fault, when one is to blame.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The line (from 1) in the file, for a policy read from text.
    pub fn line(&self) -> Option<usize> {
        self.position.map(|(line, _)| line)
    }

    /// The column (from 1, in characters) in the file, for a policy read from text.
    pub fn column(&self) -> Option<usize> {
        self.position.map(|(_, column)| column)
    }

    /// What is wrong, without the position.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, column)) = self.position {
            write!(f, "line {line}, column {column}, ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}
