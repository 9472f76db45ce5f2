//! Paged, filtered lists: the query of `GET /v1/vnfs` (`limit`, `continue`, `labelSelector`),
//! its label selector grammar, and continue tokens.
//!
//! Owns parsing and validating those parameters (each refusal names the parameter, what was
//! wrong and what is valid) and matching labels against a selector. It must not read the store
//! or decide visibility: the controller pages through the store and checks who may see what.

use std::collections::BTreeMap;

use telvirt_model::{FieldError, Name};

/// The most items one page may ask for.
pub const MAX_LIMIT: usize = 1000;

/// Longest label key and value a selector may name.
const MAX_KEY: usize = 253;
const MAX_VALUE: usize = 63;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`: the label is present with that value.
    Equals(String, String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String, String),
    /// `key`: the label is present (any value).
    Exists(String),
    /// `!key`: the label is absent.
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        }
    }
}

/// A Kubernetes-style equality selector: comma-separated requirements, all of which must hold.
/// The empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Parses `k=v,k2!=v2,k3,!k4`. Errors name `labelSelector`, the term and why.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self { requirements });
        }
        for (i, term) in text.split(',').enumerate() {
            let requirement = parse_term(term.trim()).map_err(|why| {
                FieldError::new(
                    "labelSelector",
                    format!(
                        "term {} ({term:?}) {why}; a selector is comma-separated terms: key=value, key==value, key!=value, key (present) or !key (absent)",
                        i + 1
                    ),
                )
            })?;
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if term.is_empty() {
        return Err("is empty".into());
    }
    if let Some(key) = term.strip_prefix('!') {
        if key.contains(['=', '!']) {
            return Err("mixes `!key` with an operator".into());
        }
        return Ok(Requirement::Absent(check_key(key.trim())?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            check_key(key.trim())?,
            check_value(value.trim())?,
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(
            check_key(key.trim())?,
            check_value(value.trim())?,
        ));
    }
    Ok(Requirement::Exists(check_key(term)?))
}

fn check_key(key: &str) -> Result<String, String> {
    if key.is_empty() {
        return Err("has no label key".into());
    }
    if key.len() > MAX_KEY {
        return Err(format!("has a key longer than {MAX_KEY} characters"));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "has {c:?} in its key; keys use letters, digits, '.', '_', '-' and '/'"
        ));
    }
    Ok(key.to_owned())
}

fn check_value(value: &str) -> Result<String, String> {
    if value.len() > MAX_VALUE {
        return Err(format!("has a value longer than {MAX_VALUE} characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "has {c:?} in its value; values use letters, digits, '.', '_' and '-' (or are empty)"
        ));
    }
    Ok(value.to_owned())
}

/// What a list asks for: at most `limit` items (all when `None`) after the continue token,
/// those matching `selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The name of the last item of the previous page: this page starts after it.
    pub after: Option<Name>,
    pub selector: Selector,
}

impl ListQuery {
    /// From the query string's pairs, already percent-decoded. Every parameter is checked: an
    /// unknown or repeated one, a bad limit, token or selector is refused naming it.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, FieldError> {
        let mut query = ListQuery::default();
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in pairs {
            if seen.contains(&key) {
                return Err(FieldError::new(
                    key,
                    "is given more than once; give it once",
                ));
            }
            seen.push(key);
            match key {
                "limit" => query.limit = Some(parse_limit(value)?),
                "continue" => query.after = Some(parse_token(value)?),
                "labelSelector" => query.selector = Selector::parse(value)?,
                other => {
                    return Err(FieldError::new(
                        other,
                        "is not a parameter of this list; it takes limit, continue and labelSelector",
                    ));
                }
            }
        }
        Ok(query)
    }
}

fn parse_limit(value: &str) -> Result<usize, FieldError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            FieldError::new(
                "limit",
                format!("{value:?} is not a whole number from 1 to {MAX_LIMIT}"),
            )
        })
}

/// A continue token is the name of the last item of the previous page, as the server gave it.
fn parse_token(value: &str) -> Result<Name, FieldError> {
    value.parse::<Name>().map_err(|_| {
        FieldError::new(
            "continue",
            format!(
                "{value:?} is not a continue token this server gave; pass the X-Continue header of the previous page unchanged"
            ),
        )
    })
}

/// One page of a list: its items, and the token of the next page when there may be more.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub continue_token: Option<String>,
}

/// The continue token that resumes a list after the item named `last`.
pub fn token_after(last: &Name) -> String {
    last.as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_operator_matches_as_documented() {
        let edge = labels(&[("role", "edge"), ("zone", "a")]);
        let core = labels(&[("role", "core")]);
        let none = labels(&[]);
        let cases = [
            ("role=edge", [true, false, false]),
            ("role==edge", [true, false, false]),
            ("role!=edge", [false, true, true]),
            ("zone", [true, false, false]),
            ("!zone", [false, true, true]),
            ("role, !zone", [false, true, false]),
            ("role=edge,zone=a", [true, false, false]),
            ("role=", [false, false, false]),
            ("", [true, true, true]),
        ];
        for (text, want) in cases {
            let s = Selector::parse(text).unwrap();
            let got = [s.matches(&edge), s.matches(&core), s.matches(&none)];
            assert_eq!(got, want, "selector {text:?}");
        }
    }

    #[test]
    fn bad_selectors_are_refused_naming_the_term() {
        for (text, why) in [
            ("role=edge,", "term 2"),
            ("=edge", "no label key"),
            ("ro le=edge", "' '"),
            ("role=ed ge", "in its value"),
            ("!role=edge", "mixes"),
            ("role=a=b", "'='"),
            ("role in (a,b)", "term 1"),
        ] {
            let e = Selector::parse(text).unwrap_err();
            assert_eq!(e.path, "labelSelector");
            assert!(e.reason.contains(why), "{text:?}: {}", e.reason);
        }
    }

    #[test]
    fn query_parameters_are_checked() {
        let q = ListQuery::from_pairs([("limit", "5"), ("continue", "fw1")]).unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.after.unwrap().as_str(), "fw1");
        for (pairs, field) in [
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "1001")], "limit"),
            (vec![("limit", "ten")], "limit"),
            (vec![("limit", "-1")], "limit"),
            (vec![("continue", "/vnfs/x")], "continue"),
            (vec![("labelSelector", "a=b c")], "labelSelector"),
            (vec![("label", "a=b")], "label"),
            (vec![("limit", "1"), ("limit", "2")], "limit"),
        ] {
            let e = ListQuery::from_pairs(pairs.clone()).unwrap_err();
            assert_eq!(e.path, field, "{pairs:?}: {e}");
        }
    }
}
