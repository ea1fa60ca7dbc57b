//! Decoding one document into its typed form, with unknown fields reported as problems
//! rather than silently dropped.

use serde::de::DeserializeOwned;

use super::Problem;

/// `serde_ignored`'s path in the `a.b[0].c` style of `serde_path_to_error`.
fn ignored_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path as P;
    match path {
        P::Root => {}
        P::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push_str(&format!("[{index}]"));
        }
        P::Map { parent, key } => {
            ignored_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent, out)
        }
    }
}

/// Decode a document as `T`. A document that decodes comes back with its unknown fields as
/// problems (its conversion may find more); one that does not is an error.
pub(crate) fn decode<'de, T: DeserializeOwned>(
    de: impl serde::Deserializer<'de>,
    kind: &'static str,
) -> Result<(T, Vec<Problem>), Vec<Problem>> {
    let mut problems = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| {
        let mut field = String::new();
        ignored_path(&path, &mut field);
        problems.push(Problem::UnknownField { field, kind });
    };
    let de = serde_ignored::Deserializer::new(de, &mut on_ignored);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok((v, problems)),
        Err(e) => {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            // serde_yaml prefixes its own copy of the path.
            let reason = message
                .strip_prefix(&format!("{path}: "))
                .unwrap_or(&message);
            let reason = reason.to_owned();
            let field = if path == "." {
                "(document)".into()
            } else {
                path
            };
            problems.push(Problem::Decode { field, reason });
            Err(problems)
        }
    }
}
