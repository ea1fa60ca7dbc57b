//! Rules a VirtualService never uses, as Istio's validation finds them: a rule after a rule
//! without matches, a rule whose matches all repeat earlier ones (IST0130), a match that
//! repeats an earlier one or whose URI prefix an earlier, shorter prefix with otherwise the
//! same conditions already covers (IST0131). Names follow Istio: a rule or match is `"name"`
//! when it has one, else `#index`.

use super::{INEFFECTIVE_MATCH, Sink, UNREACHABLE_RULE};
use crate::config::routing::{HttpMatch, StringMatch, VirtualService};

const KIND: &str = "VirtualService";

fn name(name: Option<&str>, index: usize) -> String {
    match name {
        Some(n) => format!("{n:?}"),
        None => format!("#{index}"),
    }
}

/// One rule's matches for the analysis: names, and conditions comparable for equality.
struct Rule<M> {
    name: String,
    matches: Vec<(String, M)>,
}

pub fn check(sink: &mut Sink<'_>, vs: &VirtualService) {
    let http: Vec<Rule<HttpMatch>> = vs
        .http
        .iter()
        .enumerate()
        .map(|(i, r)| Rule {
            name: name(r.name.as_deref(), i),
            matches: (r.matches.iter().enumerate())
                .map(|(j, m)| {
                    let unnamed = HttpMatch {
                        name: None,
                        ..m.clone()
                    };
                    (name(m.name.as_deref(), j), unnamed)
                })
                .collect(),
        })
        .collect();
    let tcp: Vec<Rule<_>> = vs
        .tcp
        .iter()
        .enumerate()
        .map(|(i, r)| Rule {
            name: name(None, i),
            matches: (r.matches.iter().enumerate())
                .map(|(j, m)| (name(None, j), m.clone()))
                .collect(),
        })
        .collect();
    let mut report = |code, text| sink.report(KIND, &vs.id, code, text);
    let firsts = duplicates(&http, &mut report);
    covered_prefixes(&firsts, &mut report);
    duplicates(&tcp, &mut report);
}

/// Rules after a rule without matches, and matches equal to earlier ones. Returns the
/// matches that were not duplicates, with their rule's name.
fn duplicates<'a, M: PartialEq>(
    rules: &'a [Rule<M>],
    report: &mut impl FnMut(super::Code, String),
) -> Vec<(&'a str, &'a str, &'a M)> {
    let unreachable =
        |rule: &str, reason: &str| format!("VirtualService rule {rule} not used ({reason}).");
    let mut firsts: Vec<(&str, &str, &M)> = Vec::new();
    let mut catch_all = false;
    for rule in rules {
        if rule.matches.is_empty() {
            if catch_all {
                let text = unreachable(&rule.name, "only the last rule can have no matches");
                report(UNREACHABLE_RULE, text);
            }
            catch_all = true;
            continue;
        }
        if catch_all {
            let text = unreachable(&rule.name, "route without matches defined before");
            report(UNREACHABLE_RULE, text);
            continue;
        }
        let mut repeated = 0;
        for (match_name, m) in &rule.matches {
            match firsts.iter().find(|(_, _, earlier)| *earlier == m) {
                Some((earlier_rule, _, _)) => {
                    let text = format!(
                        "VirtualService rule {} match {match_name} is not used \
                         (duplicate/overlapping match in rule {earlier_rule}).",
                        rule.name
                    );
                    report(INEFFECTIVE_MATCH, text);
                    repeated += 1;
                }
                None => firsts.push((&rule.name, match_name, m)),
            }
        }
        if repeated == rule.matches.len() {
            report(
                UNREACHABLE_RULE,
                unreachable(&rule.name, "all matches used by prior rules"),
            );
        }
    }
    firsts
}

/// A URI prefix match covered by an earlier, shorter prefix whose other conditions are the
/// same (Istio compares fewer conditions; this only reports what is surely covered).
fn covered_prefixes(
    matches: &[(&str, &str, &HttpMatch)],
    report: &mut impl FnMut(super::Code, String),
) {
    let prefixed: Vec<(&str, &str, &str, HttpMatch)> = matches
        .iter()
        .filter_map(|(rule, name, m)| match &m.uri {
            Some(StringMatch::Prefix(p)) => {
                let rest = HttpMatch {
                    uri: None,
                    ..(*m).clone()
                };
                Some((*rule, *name, p.as_str(), rest))
            }
            _ => None,
        })
        .collect();
    for (i, (a_rule, a_name, a_prefix, a_rest)) in prefixed.iter().enumerate() {
        for (b_rule, b_name, b_prefix, b_rest) in &prefixed[i + 1..] {
            if b_prefix != a_prefix && b_prefix.starts_with(a_prefix) && a_rest == b_rest {
                let text = format!(
                    "VirtualService rule {b_rule} match {b_name} of prefix {b_prefix} is not used \
                     (duplicate/overlapping match in rule {a_name} of prefix {a_prefix} on {a_rule})."
                );
                report(INEFFECTIVE_MATCH, text);
            }
        }
    }
}
