//! The HTTP side: routing, lists, watches and discovery.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::select::Selector;
use super::{Msg, Shared, TypeInfo, Watch, gone_event, with_types};

pub(super) type Body_ = BoxBody<Bytes, std::io::Error>;

pub(super) async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let conn = tokio::select! {
            _ = &mut stopped => return,
            conn = listener.accept() => conn,
        };
        let Ok((stream, _)) = conn else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

pub(super) fn full(status: StatusCode, body: &Value) -> Response<Body_> {
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(super) fn status(code: u16, reason: &str, message: &str) -> Response<Body_> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| decode(v))
    })
}

/// What a path names.
pub(super) enum Target {
    Discovery(Value),
    Collection {
        t: TypeInfo,
        version: String,
        namespace: Option<String>,
    },
    /// One object: `(type, version, namespace or "", name)`.
    Object(TypeInfo, String, String, String),
}

pub(super) fn route(shared: &Shared, path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let st = shared.lock();
    let served = |group: &str, version: &str| -> Vec<TypeInfo> {
        let served = st.types.iter().filter(|t| t.group == group);
        served
            .filter(|t| t.versions.iter().any(|v| v == version))
            .cloned()
            .collect()
    };
    let resources = |group: &str, version: &str| {
        let types = served(group, version);
        let list: Vec<Value> = types
            .iter()
            .map(|t| {
                json!({"name": t.plural, "singularName": t.kind.to_lowercase(),
                            "namespaced": t.namespaced, "kind": t.kind,
                            "verbs": ["get", "list", "watch"]})
            })
            .collect();
        let gv = TypeInfo::new(group, &[version], "", "", false).api_version(version);
        (!types.is_empty()).then(|| {
            Target::Discovery(json!({"kind": "APIResourceList", "apiVersion": "v1",
                                     "groupVersion": gv, "resources": list}))
        })
    };
    let collection = |group: &str, version: &str, ns: Option<&str>, plural: &str| {
        let t = served(group, version)
            .into_iter()
            .find(|t| t.plural == plural)?;
        Some(Target::Collection {
            t,
            version: version.to_owned(),
            namespace: ns.map(str::to_owned),
        })
    };
    let object = |group: &str, version: &str, ns: &str, plural: &str, name: &str| {
        let t = served(group, version)
            .into_iter()
            .find(|t| t.plural == plural && t.namespaced != ns.is_empty())?;
        Some(Target::Object(
            t,
            version.to_owned(),
            ns.to_owned(),
            name.to_owned(),
        ))
    };
    match parts.as_slice() {
        ["api"] => Some(Target::Discovery(
            json!({"kind": "APIVersions", "versions": ["v1"]}),
        )),
        ["apis"] => {
            let mut groups: Vec<&str> = st.types.iter().map(|t| t.group.as_str()).collect();
            groups.retain(|g| !g.is_empty());
            groups.dedup();
            let list: Vec<Value> = groups
                .iter()
                .map(|g| {
                    let vs: Vec<&String> = st
                        .types
                        .iter()
                        .filter(|t| t.group == *g)
                        .flat_map(|t| &t.versions)
                        .collect();
                    let vs: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": vs, "preferredVersion": vs.first()})
                })
                .collect();
            Some(Target::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
            ))
        }
        ["api", v] => resources("", v),
        ["apis", g, v] => resources(g, v),
        ["api", v, p] => collection("", v, None, p),
        ["api", v, "namespaces", ns, p] => collection("", v, Some(ns), p),
        ["apis", g, v, p] => collection(g, v, None, p),
        ["apis", g, v, "namespaces", ns, p] => collection(g, v, Some(ns), p),
        ["api", v, "namespaces", ns, p, name] => object("", v, ns, p, name),
        ["apis", g, v, "namespaces", ns, p, name] => object(g, v, ns, p, name),
        ["api", v, p, name] => object("", v, "", p, name),
        ["apis", g, v, p, name] => object(g, v, "", p, name),
        _ => None,
    }
}

/// Waits while a hold covers `class` (`list:pods`) or its wildcard (`list:*`).
async fn wait_released(shared: &Shared, class: &str) {
    let wildcard = format!("{}:*", class.split(':').next().unwrap_or_default());
    let mut rx = shared.holds.subscribe();
    let _ = rx
        .wait_for(|h| !h.contains(class) && !h.contains(&wildcard))
        .await;
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body_> {
    let path = req.uri().path().to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.to_string());
    shared
        .lock()
        .requests
        .push(format!("{} {}", req.method(), decode(&pq)));
    if req.method() == Method::POST && path == super::auth::PATH {
        return super::auth::review(shared, req).await;
    }
    if matches!(*req.method(), Method::POST | Method::PATCH) {
        return super::write::handle(shared, req, &path).await;
    }
    if req.method() != Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            &format!("the fake API server does not serve {}", req.method()),
        );
    }
    let Some(target) = route(shared, &path) else {
        return status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        );
    };
    let (t, version, namespace) = match target {
        Target::Discovery(v) => return full(StatusCode::OK, &v),
        Target::Object(t, version, ns, name) => return get_one(shared, &t, &version, ns, name),
        Target::Collection {
            t,
            version,
            namespace,
        } => (t, version, namespace),
    };
    let watching = matches!(query(&req, "watch").as_deref(), Some("true" | "1"));
    let class = format!("{}:{}", if watching { "watch" } else { "list" }, t.plural);
    wait_released(shared, &class).await;
    if let Some(code) = shared.lock().failing.get(&t.plural).copied() {
        return status(
            code,
            "InternalError",
            &format!("{} failing on purpose", t.plural),
        );
    }
    let fields = Selector::parse(&query(&req, "fieldSelector").unwrap_or_default());
    let labels = Selector::parse(&query(&req, "labelSelector").unwrap_or_default());
    let api_version = t.api_version(&version);
    let (tx, rx) = mpsc::unbounded_channel();
    let watch = Watch {
        group: t.group.clone(),
        plural: t.plural.clone(),
        api_version: api_version.clone(),
        kind: t.kind.clone(),
        namespace,
        fields,
        labels,
        bookmarks: query(&req, "allowWatchBookmarks").as_deref() == Some("true"),
        tx,
    };
    let mut st = shared.lock();
    let objects = st.objects.get(&(t.group.clone(), t.plural.clone()));
    let current: Vec<&Value> = objects.into_iter().flat_map(|o| o.values()).collect();
    if !watching {
        // Core kinds' list items carry no apiVersion/kind; custom resources' do.
        let items: Vec<Value> = current
            .into_iter()
            .filter(|o| watch.matches(o))
            .map(|o| match t.group.as_str() {
                "" | "discovery.k8s.io" => o.clone(),
                _ => with_types(o, &api_version, &t.kind),
            })
            .collect();
        let list = json!({"kind": format!("{}List", t.kind), "apiVersion": api_version,
                          "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
        return full(StatusCode::OK, &list);
    }
    let from = query(&req, "resourceVersion").unwrap_or_default();
    let mut gone = false;
    match from.as_str() {
        // "Any" or "most recent": the current state as ADDED, then changes.
        "" | "0" => {
            for o in current.into_iter().filter(|o| watch.matches(o)) {
                watch.send("ADDED", o);
            }
        }
        rv => match rv.parse::<u64>() {
            Ok(rv) if rv >= st.compacted => {
                for c in st.history.iter().filter(|c| c.rv > rv) {
                    if let Some(kind) = watch.event(c) {
                        watch.send(kind, &c.new);
                    }
                }
            }
            Ok(_) => {
                let _ = watch
                    .tx
                    .send(Msg::Line(Bytes::from(gone_event(st.compacted) + "\n")));
                gone = true;
            }
            Err(_) => {
                return status(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {rv:?}"),
                );
            }
        },
    }
    let timeout = query(&req, "timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    // After a 410 the watch is not registered: its sender drops and the body ends.
    if !gone {
        st.watches.push(watch);
    }
    drop(st);
    let body = WatchBody {
        rx,
        deadline: Box::pin(tokio::time::sleep(Duration::from_secs(timeout))),
    };
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET` of one object: it, or a 404 Status as the real server says it.
fn get_one(
    shared: &Shared,
    t: &TypeInfo,
    version: &str,
    namespace: String,
    name: String,
) -> Response<Body_> {
    let st = shared.lock();
    if let Some(code) = st.failing.get(&t.plural).copied() {
        return status(
            code,
            "InternalError",
            &format!("{} failing on purpose", t.plural),
        );
    }
    let found = st
        .objects
        .get(&(t.group.clone(), t.plural.clone()))
        .and_then(|o| o.get(&(namespace, name.clone())));
    match found {
        Some(obj) => full(
            StatusCode::OK,
            &with_types(obj, &t.api_version(version), &t.kind),
        ),
        None => status(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", t.plural),
        ),
    }
}

/// A watch's chunked body: lines until the server drops the watch (a clean end), the
/// timeout passes, or an abort cuts the connection.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<Msg>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Msg::Line(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Msg::Abort)) => Poll::Ready(Some(Err(std::io::Error::other(
                "watch dropped by the test",
            )))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
