//! `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered from what the test programmed
//! with [`FakeApiServer::review_token`](super::FakeApiServer::review_token): the status of a
//! known token as given (so a test can also return what a real server would not, such as
//! another audience); any other token is not authenticated, as the real server answers.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::Shared;
use super::http::{Body_, full, status};

pub(super) const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const PLURAL: &str = "tokenreviews";

/// The status of a token that authenticates as `username` with these `extra` values and
/// audiences (what a projected service-account token's review says).
pub fn authenticated(username: &str, extra: &[(&str, &str)], audiences: &[&str]) -> Value {
    let extra: serde_json::Map<String, Value> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!([v])))
        .collect();
    let groups = match username.split(':').collect::<Vec<_>>().as_slice() {
        ["system", "serviceaccount", ns, _] => json!([
            "system:serviceaccounts",
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated"
        ]),
        _ => json!(["system:authenticated"]),
    };
    json!({
        "authenticated": true,
        "user": {"username": username, "uid": "fake-user-uid", "groups": groups, "extra": extra},
        "audiences": audiences,
    })
}

/// The status of a token the API server does not accept.
pub fn unauthenticated(error: &str) -> Value {
    json!({"authenticated": false, "error": error})
}

pub(super) async fn review(shared: &Shared, req: Request<Incoming>) -> Response<Body_> {
    if let Some(code) = shared.lock().failing.get(PLURAL).copied() {
        return status(code, "InternalError", "tokenreviews failing on purpose");
    }
    let body: Bytes = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(400, "BadRequest", &format!("reading the body: {e}")),
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let mut st = shared.lock();
    st.token_reviews_seen
        .push(review["spec"]["audiences"].clone());
    let answer = st
        .token_reviews
        .get(token)
        .cloned()
        .unwrap_or_else(|| unauthenticated("invalid bearer token"));
    let mut out = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"].clone(),
        "status": answer,
    });
    // The real server echoes the spec; the token is not worth sending back.
    if let Some(spec) = out["spec"].as_object_mut() {
        spec.remove("token");
    }
    full(StatusCode::CREATED, &out)
}
