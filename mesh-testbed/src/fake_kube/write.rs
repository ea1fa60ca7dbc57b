//! Writes: `POST` to a collection (create) and `PATCH` of one object (JSON merge patch,
//! RFC 7386), answered as the real API server answers them: 201 / 200 with the stored object,
//! 404 NotFound, 409 AlreadyExists, 409 Conflict on a stale `metadata.resourceVersion`, 400
//! BadRequest for a body that does not fit the URL, 415 for other patch types, 422 Invalid for
//! a `kubernetes.io/tls` Secret without `tls.crt` and `tls.key`. Watches see the change.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::http::{Body_, Target, full, route, status};
use super::{Shared, TypeInfo, with_types};

/// Largest request body accepted (the real server's limit is 3 MiB per object).
const MAX_BODY: usize = 4 << 20;

pub(super) async fn handle(shared: &Shared, req: Request<Incoming>, path: &str) -> Response<Body_> {
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(target) = route(shared, path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let plural = match &target {
        Target::Collection { t, .. } | Target::Object(t, ..) => t.plural.clone(),
        Target::Discovery(_) => String::new(),
    };
    if let Some(code) = shared.lock().failing.get(&plural).copied() {
        return status(
            code,
            "InternalError",
            &format!("{plural} failing on purpose"),
        );
    }
    let body: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(400, "BadRequest", &format!("reading the body: {e}")),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    match (method, target) {
        (
            Method::POST,
            Target::Collection {
                t,
                version,
                namespace,
            },
        ) => create(shared, &t, &version, namespace, body),
        (Method::PATCH, Target::Object(t, version, ns, name)) => {
            if content_type != "application/merge-patch+json" {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake API server only merge-patches, not {content_type:?}"),
                );
            }
            patch(shared, &t, &version, (ns, name), &body)
        }
        (m, _) => status(
            405,
            "MethodNotAllowed",
            &format!("the fake API server does not serve {m} {path}"),
        ),
    }
}

/// What the real server's validation says of a Secret the fake stores.
fn invalid_secret(obj: &Value) -> Option<String> {
    if obj["type"].as_str() != Some("kubernetes.io/tls") {
        return None;
    }
    let missing: Vec<String> = ["tls.crt", "tls.key"]
        .iter()
        .filter(|k| obj["data"][**k].is_null())
        .map(|k| format!("data[{k}]: Required value"))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn create(
    shared: &Shared,
    t: &TypeInfo,
    version: &str,
    namespace: Option<String>,
    mut obj: Value,
) -> Response<Body_> {
    let api_version = t.api_version(version);
    if obj["apiVersion"].as_str() != Some(api_version.as_str())
        || obj["kind"].as_str() != Some(t.kind.as_str())
    {
        return status(
            400,
            "BadRequest",
            &format!(
                "the object is {:?} {:?}, not {api_version} {} of the URL",
                obj["apiVersion"], obj["kind"], t.kind
            ),
        );
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return status(
            422,
            "Invalid",
            &format!("{} is invalid: metadata.name: Required value", t.kind),
        );
    }
    let ns = match (
        t.namespaced,
        namespace,
        obj["metadata"]["namespace"].as_str(),
    ) {
        (true, Some(url), Some(body)) if url != body => {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            );
        }
        (true, Some(url), _) => url,
        (false, None, _) => String::new(),
        _ => return status(404, "NotFound", "no such collection"),
    };
    if t.kind == "Secret" {
        if obj.get("stringData").is_some() {
            return status(
                422,
                "Invalid",
                "the fake API server does not convert stringData; send data",
            );
        }
        if let Some(reason) = invalid_secret(&obj) {
            return status(
                422,
                "Invalid",
                &format!("Secret {name:?} is invalid: {reason}"),
            );
        }
    }
    let mut st = shared.lock();
    // Another client's create that the test made win the race.
    if let Some(i) = st
        .races
        .iter()
        .position(|r| r.0 == t.plural && r.1 == ns && r.2 == name)
    {
        let (_, _, _, winner) = st.races.remove(i);
        if let Err(e) = st.store(t, winner) {
            return status(500, "InternalError", &e.to_string());
        }
    }
    let exists = st
        .objects
        .get(&(t.group.clone(), t.plural.clone()))
        .is_some_and(|o| o.contains_key(&(ns.clone(), name.clone())));
    if exists {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("{} {name:?} already exists", t.plural),
            "reason": "AlreadyExists",
            "details": {"name": name, "group": t.group, "kind": t.plural}, "code": 409});
        return full(StatusCode::CONFLICT, &body);
    }
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    if t.namespaced {
        obj["metadata"]["namespace"] = ns.into();
    }
    // The server owns these.
    for field in ["resourceVersion", "uid", "creationTimestamp"] {
        if let Some(meta) = obj["metadata"].as_object_mut() {
            meta.remove(field);
        }
    }
    match st.store(t, obj) {
        Ok(stored) => full(
            StatusCode::CREATED,
            &with_types(&stored, &api_version, &t.kind),
        ),
        Err(e) => status(500, "InternalError", &e.to_string()),
    }
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(map) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn patch(
    shared: &Shared,
    t: &TypeInfo,
    version: &str,
    key: (String, String),
    patch: &Value,
) -> Response<Body_> {
    let mut st = shared.lock();
    let current = st
        .objects
        .get(&(t.group.clone(), t.plural.clone()))
        .and_then(|o| o.get(&key))
        .cloned();
    let name = key.1;
    let Some(mut obj) = current else {
        return status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", t.plural),
        );
    };
    let want_rv = &patch["metadata"]["resourceVersion"];
    if !want_rv.is_null() && *want_rv != obj["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                t.plural
            ),
        );
    }
    merge_patch(&mut obj, patch);
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    if obj["metadata"]["name"].as_str() != Some(name.as_str()) {
        return status(400, "BadRequest", "a patch cannot change metadata.name");
    }
    if t.kind == "Secret"
        && let Some(reason) = invalid_secret(&obj)
    {
        return status(
            422,
            "Invalid",
            &format!("Secret {name:?} is invalid: {reason}"),
        );
    }
    match st.store(t, obj) {
        Ok(stored) => full(
            StatusCode::OK,
            &with_types(&stored, &t.api_version(version), &t.kind),
        ),
        Err(e) => status(500, "InternalError", &e.to_string()),
    }
}
