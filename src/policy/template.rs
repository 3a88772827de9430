//! Templates: text with placeholders that read the request (`customer:{path.customer_id}`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use http::{HeaderName, Request};
use serde::de::{Deserialize, Deserializer, Error as _};
use serde_json::Value;

use super::PolicyError;
use crate::Rejection;
use crate::extract;

/// Where a placeholder reads its value from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// `{path.NAME}`: the path parameter `{NAME}` of the route's pattern.
    Path(String),
    /// `{header.NAME}`: a request header (`400` when it is missing).
    Header(HeaderName),
    /// `{query.NAME}`: a query parameter, percent-decoded (`400` when it is missing).
    Query(String),
    /// `{body./json/pointer}`: the value at a JSON pointer (RFC 6901) in the JSON body: a string,
    /// or a number written as JSON writes it (`415` for a body that is not JSON, `400` for
    /// malformed JSON, `422` when the pointer finds nothing or another kind of value).
    Body(String),
}

impl Source {
    fn parse(text: &str) -> Result<Self, String> {
        let Some((kind, name)) = text.split_once('.') else {
            return Err(format!(
                "{{{text}}} names no source: write {{path.NAME}}, {{header.NAME}}, {{query.NAME}} or {{body./pointer}}"
            ));
        };
        match kind {
            "path" | "query" if name.is_empty() => {
                Err(format!("{{{text}}} names no {kind} parameter"))
            }
            "path" => Ok(Source::Path(name.to_owned())),
            "query" => Ok(Source::Query(name.to_owned())),
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(Source::Header)
                .map_err(|_| format!("{name:?} is not a header name")),
            "body" if name.starts_with('/') => Ok(Source::Body(name.to_owned())),
            "body" => Err(format!(
                "a body placeholder is a JSON pointer starting with '/', not {name:?}"
            )),
            _ => Err(format!(
                "unknown source {kind:?} in {{{text}}}: use path, header, query or body"
            )),
        }
    }

    /// The value as text.
    pub(crate) fn read<'a>(&self, request: &'a Request<Bytes>) -> Result<Cow<'a, str>, Rejection> {
        match self {
            Source::Path(name) => extract::path_param(request, name).map(Cow::Borrowed),
            Source::Header(name) => extract::header(request, name.as_str()).map(Cow::Borrowed),
            Source::Query(name) => extract::query(request, name).map(Cow::Owned),
            Source::Body(pointer) => {
                let value: Value = extract::json_pointer(request, pointer)?;
                scalar_text(&value).map(Cow::Owned).ok_or_else(|| {
                    Rejection::unprocessable(format!(
                        "the value at {pointer} is not a string or a number"
                    ))
                })
            }
        }
    }

    /// The value as a whole number: a JSON integer in the body, digits elsewhere.
    pub(crate) fn read_number(&self, request: &Request<Bytes>) -> Result<u64, Rejection> {
        match self {
            Source::Body(pointer) => extract::json_pointer::<u64>(request, pointer),
            _ => {
                let text = self.read(request)?;
                text.trim().parse().map_err(|_| {
                    Rejection::bad_request(format!("{self} is not a whole number: {text:?}"))
                })
            }
        }
    }
}

impl Source {
    /// What the client sent, named as the client knows it: `the value at /email`, `the header
    /// x-username`.
    fn words(&self) -> String {
        match self {
            Source::Path(name) => format!("the path parameter {name}"),
            Source::Header(name) => format!("the header {name}"),
            Source::Query(name) => format!("the query parameter {name}"),
            Source::Body(pointer) => format!("the value at {pointer}"),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path(name) => write!(f, "{{path.{name}}}"),
            Source::Header(name) => write!(f, "{{header.{name}}}"),
            Source::Query(name) => write!(f, "{{query.{name}}}"),
            Source::Body(pointer) => write!(f, "{{body.{pointer}}}"),
        }
    }
}

/// A JSON string as it is, a number as JSON writes it; nothing else.
pub(crate) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Text with placeholders that read the request: `customer:{path.customer_id}`,
/// `{header.x-api-key}`, `tenant:{query.tenant}:{body./plan}`.
///
/// A placeholder is `{SOURCE.NAME}` with `SOURCE` one of `path`, `header`, `query`, `body` (see
/// [`Source`]); every other character is itself. Braces appear only as placeholders.
///
/// ```
/// use tower_reserve::policy::Template;
///
/// let key: Template = "customer:{path.customer_id}".parse().unwrap();
/// assert_eq!(key.to_string(), "customer:{path.customer_id}");
/// assert!("customer:{path.customer_id".parse::<Template>().is_err());
/// assert!("{cookie.session}".parse::<Template>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Value(Source),
}

impl Template {
    /// Parses a template.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        Self::parse_text(text).map_err(PolicyError::new)
    }

    fn parse_text(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(at) if rest.as_bytes()[at] == b'}' => {
                    return Err(format!("a '}}' without its '{{' in {text:?}"));
                }
                Some(at) => {
                    if at > 0 {
                        parts.push(Part::Text(rest[..at].to_owned()));
                    }
                    let after = &rest[at + 1..];
                    let end = after
                        .find(['{', '}'])
                        .filter(|&end| after.as_bytes()[end] == b'}')
                        .ok_or_else(|| format!("a '{{' without its '}}' in {text:?}"))?;
                    parts.push(Part::Value(Source::parse(&after[..end])?));
                    rest = &after[end + 1..];
                }
                None => {
                    parts.push(Part::Text(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if parts.is_empty() {
            return Err("a template may not be empty".to_owned());
        }
        Ok(Self { parts })
    }

    /// A template of one placeholder.
    pub fn source(source: Source) -> Self {
        Self {
            parts: vec![Part::Value(source)],
        }
    }

    /// The placeholder, when the template is exactly one.
    pub fn as_source(&self) -> Option<&Source> {
        match self.parts.as_slice() {
            [Part::Value(source)] => Some(source),
            _ => None,
        }
    }

    /// The placeholders, in order.
    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.parts.iter().filter_map(|p| match p {
            Part::Value(source) => Some(source),
            Part::Text(_) => None,
        })
    }

    /// The template's fixed text, placeholders left out.
    pub(crate) fn literal_text(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Text(text) => Some(text.as_str()),
            Part::Value(_) => None,
        })
    }

    /// What the rendered text is made of, as the client knows it (`the value at /email`; `the
    /// value made of the header x-tenant and the value at /name`), for what the client is told
    /// about it.
    pub(crate) fn words(&self) -> String {
        let sources: Vec<String> = self.sources().map(Source::words).collect();
        match sources.as_slice() {
            [] => "the value".to_owned(),
            [one] if self.as_source().is_some() => one.clone(),
            many => format!("the value made of {}", many.join(" and ")),
        }
    }

    /// The text, with each placeholder read from `request`.
    pub(crate) fn render(&self, request: &Request<Bytes>) -> Result<String, Rejection> {
        if let [Part::Value(source)] = self.parts.as_slice() {
            return source.read(request).map(Cow::into_owned);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Value(source) => out.push_str(&source.read(request)?),
            }
        }
        Ok(out)
    }
}

impl FromStr for Template {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(text) => f.write_str(text)?,
                Part::Value(source) => write!(f, "{source}")?,
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        Self::parse_text(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_into_text_and_sources() {
        let t = Template::parse("a:{path.id}:{header.X-Key}{query.q}{body./x/0}").unwrap();
        let sources: Vec<_> = t.sources().cloned().collect();
        assert_eq!(
            sources,
            [
                Source::Path("id".into()),
                Source::Header(HeaderName::from_static("x-key")),
                Source::Query("q".into()),
                Source::Body("/x/0".into()),
            ]
        );
        assert_eq!(t.literal_text().collect::<Vec<_>>(), ["a:", ":"]);
        assert_eq!(
            t.to_string(),
            "a:{path.id}:{header.x-key}{query.q}{body./x/0}"
        );
        for bad in [
            "",
            "{",
            "}",
            "a{path.id",
            "a}b",
            "{path.}",
            "{path}",
            "{body.x}",
            "{x.y}",
            "{header.a b}",
            "{path.{id}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn templates_read_the_request() {
        let mut req = Request::post("/c/42/buy?tenant=t%201")
            .header("x-key", "k-1")
            .header("content-type", "application/json")
            .body(Bytes::from_static(
                br#"{"customer": {"id": 7, "name": "ann"}}"#,
            ))
            .unwrap();
        req.extensions_mut()
            .insert(extract::RoutePattern("/c/{id}/buy".into()));
        let t = Template::parse(
            "{path.id}|{header.x-key}|{query.tenant}|{body./customer/id}|{body./customer/name}",
        )
        .unwrap();
        assert_eq!(t.render(&req).unwrap(), "42|k-1|t 1|7|ann");
        assert_eq!(
            Template::parse("{body./email}").unwrap().words(),
            "the value at /email"
        );
        assert_eq!(
            Template::parse("{header.x-tenant}:{query.name}")
                .unwrap()
                .words(),
            "the value made of the header x-tenant and the query parameter name"
        );
        let missing = Template::parse("{header.x-nope}").unwrap();
        assert_eq!(missing.render(&req).unwrap_err().status(), 400);
        let object = Template::parse("{body./customer}").unwrap();
        assert_eq!(object.render(&req).unwrap_err().status(), 422);
        let n = Source::Body("/customer/id".into());
        assert_eq!(n.read_number(&req).unwrap(), 7);
        assert_eq!(Source::Path("id".into()).read_number(&req).unwrap(), 42);
        assert_eq!(
            Source::Header(HeaderName::from_static("x-key"))
                .read_number(&req)
                .unwrap_err()
                .status(),
            400
        );
    }
}
