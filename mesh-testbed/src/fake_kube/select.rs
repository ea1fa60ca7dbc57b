//! Field and label selectors, the subset clients use: `a=v`, `a==v`, `a!=v` for fields
//! (dotted paths into the object), plus `k` and `!k` (existence) for labels; terms are
//! comma-joined and all must hold.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Missing(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector(Vec<Term>);

impl Selector {
    pub fn parse(text: &str) -> Selector {
        let terms = text.split(',').map(str::trim).filter(|t| !t.is_empty());
        Selector(
            terms
                .map(|t| {
                    if let Some((k, v)) = t.split_once("!=") {
                        Term::Ne(k.trim().into(), v.trim().into())
                    } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                        Term::Eq(k.trim().into(), v.trim().into())
                    } else if let Some(k) = t.strip_prefix('!') {
                        Term::Missing(k.trim().into())
                    } else {
                        Term::Exists(t.into())
                    }
                })
                .collect(),
        )
    }

    fn holds(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            // A missing field or label counts as "" for fields and as not equal for labels.
            Term::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Missing(k) => get(k).is_none(),
        })
    }

    pub fn matches_fields(&self, obj: &Value) -> bool {
        self.holds(|path| {
            let v = path.split('.').fold(obj, |v, part| &v[part]);
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => Some(String::new()),
                other => Some(other.to_string()),
            }
        })
    }

    pub fn matches_labels(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.holds(|k| labels[k].as_str().map(str::to_owned))
    }
}
