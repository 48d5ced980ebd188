//! Request routing and the REST verbs: discovery, get, list (pages, selectors), watch,
//! create, update, patch (JSON merge), delete.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use flotilla_proto::mvccpb::{event::EventType, KeyValue};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};

use crate::etcd::{Store, Written};
use crate::resources::{self, Resource};
use crate::status::ApiError;

mod subresources;
use subresources::{bind, scale};

pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body (kube-apiserver's limit).
pub const MAX_BODY_BYTES: usize = 3 << 20;
/// Largest object the store takes (etcd's default --max-request-bytes, less the Txn around
/// it); a bigger one is refused with 413 before it is sent.
pub const MAX_STORED_BYTES: usize = 1_500_000;
/// Deepest nesting of a stored object (JSON parsers refuse deeper documents).
const MAX_DEPTH: usize = 100;
/// Requests served at once, watches aside (kube-apiserver's --max-requests-inflight).
pub const MAX_INFLIGHT: usize = 400;
/// Longest page of a list.
const MAX_PAGE: i64 = 10_000;
/// A watch without timeoutSeconds ends after this long (clients re-watch).
const MAX_WATCH: Duration = Duration::from_secs(1800);
/// How long a watch waits for the watch cache to reach the revision it starts from.
const CACHE_CATCH_UP: Duration = Duration::from_secs(3);
/// Events a slow watcher may have waiting before it is cut off.
const WATCH_BUFFER: usize = 1024;
/// How often a watch that allows bookmarks gets one (kube-apiserver: about a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);
/// Objects read per page when a watch starts with the current objects.
const WATCH_PAGE: i64 = 500;
/// Watches one apiserver serves at once (beyond: 429).
pub const MAX_WATCHES: usize = 10_000;

pub const KUBERNETES_VERSION: (&str, &str) = ("1", "32");

/// A client's identity from its credentials.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

pub struct State {
    pub store: Store,
    /// Encryption at rest (secrets).
    pub codec: Arc<crate::crypt::Codec>,
    /// `--service-cluster-ip-range`.
    pub service_range: crate::services::IpRange,
    /// Bearer tokens (`--token-auth-file`).
    pub tokens: HashMap<String, User>,
    pub inflight: tokio::sync::Semaphore,
    pub watches: Arc<tokio::sync::Semaphore>,
    /// The lease events are written with (they expire after `EVENT_TTL`), and when it was
    /// granted; a new one is granted every `EVENT_LEASE_REUSE`.
    pub event_lease: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
    /// Set when a write met "requested lease not found": the next event gets a new lease.
    pub lease_lost: std::sync::atomic::AtomicBool,
    /// One store watch per resource, shared by the client watches.
    pub caches: crate::watch_cache::Caches,
}

/// How long events live (kube-apiserver's --event-ttl).
pub const EVENT_TTL: Duration = Duration::from_secs(3600);
const EVENT_LEASE_REUSE: Duration = Duration::from_secs(60);

/// After a write failed because its events lease is gone, the next one gets a new lease.
fn note_lost_lease(state: &State, e: &ApiError) {
    if e.message.contains("events lease") {
        state
            .lease_lost
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The lease a write of this resource attaches its key to (events expire; nothing else does).
async fn lease_for(state: &State, t: &Target) -> Result<i64, ApiError> {
    if t.resource.plural != "events" {
        return Ok(0);
    }
    let mut current = state.event_lease.lock().await;
    if let Some((id, granted)) = *current {
        // A lease the store no longer has (revoked, or a restored store) is replaced.
        if granted.elapsed() < EVENT_LEASE_REUSE
            && !state
                .lease_lost
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(id);
        }
    }
    let ttl = (EVENT_TTL + EVENT_LEASE_REUSE).as_secs() as i64;
    let id = state.store.grant_lease(ttl).await?;
    *current = Some((id, std::time::Instant::now()));
    Ok(id)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text_response(body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(code, &e.to_status());
    if e.code == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

/// Serves one request; every failure becomes a Status.
pub async fn handle(
    state: Arc<State>,
    cert_user: Arc<Option<User>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = match route(&state, cert_user.as_ref().as_ref(), req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed = ?started.elapsed(), "request");
    Ok(resp)
}

/// The request's user: from its bearer token if it has one (a bad token is refused even
/// with a good certificate, as Kubernetes does), else from its client certificate.
fn authenticate(state: &State, cert_user: Option<&User>, req: &Request<Incoming>) -> Option<User> {
    let Some(auth) = req.headers().get(header::AUTHORIZATION) else {
        return cert_user.cloned();
    };
    let token = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
    if token.is_empty() {
        return None;
    }
    state.tokens.get(token).cloned()
}

/// `kubectl auth whoami`: the user the server sees.
fn self_subject_review(user: &User) -> Value {
    let mut groups = user.groups.clone();
    groups.push("system:authenticated".into());
    json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {"username": user.name, "groups": groups}},
    })
}

async fn route(
    state: &Arc<State>,
    cert_user: Option<&User>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Health checks answer anyone (load balancers probe them without credentials).
    match segments.as_slice() {
        ["healthz"] | ["livez"] => return Ok(text_response("ok")),
        ["readyz"] => {
            state.store.get("/registry/health").await?;
            return Ok(text_response("ok"));
        }
        _ => {}
    }
    let Some(user) = authenticate(state, cert_user, &req) else {
        return Err(ApiError::unauthorized());
    };
    let query = parse_query(req.uri().query().unwrap_or(""));
    let watching = is_true(query.get("watch")) && req.method() == Method::GET;
    // Watches are long-running and do not count against the in-flight limit (they have
    // their own: `MAX_WATCHES`).
    let _permit = if watching {
        None
    } else {
        Some(
            state
                .inflight
                .try_acquire()
                .map_err(|_| ApiError::too_many_requests())?,
        )
    };
    match segments.as_slice() {
        ["version"] => Ok(json_response(StatusCode::OK, &version())),
        ["api"] | ["apis"] if wants_aggregated(&req) => {
            let core = segments == ["api"];
            let mut resp = json_response(StatusCode::OK, &crate::discovery::aggregated(core));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::discovery::AGGREGATED),
            );
            Ok(resp)
        }
        ["api"] => Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        )),
        ["apis"] => Ok(json_response(StatusCode::OK, &api_groups())),
        ["api", "v1"] => Ok(json_response(StatusCode::OK, &resource_list("", "v1"))),
        ["openapi", "v2"] => {
            let protobuf = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("protobuf"));
            if protobuf {
                let mut resp =
                    Response::new(Full::new(Bytes::from(crate::openapi::v2_protobuf())).boxed());
                // As kube-apiserver answers it (Go's mime parser refuses the `@` of the
                // media type kubectl asks for).
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/octet-stream"),
                );
                Ok(resp)
            } else {
                Ok(json_response(StatusCode::OK, &crate::openapi::v2_json()))
            }
        }
        ["openapi", "v3"] => Ok(json_response(StatusCode::OK, &crate::openapi::v3_root())),
        ["openapi", "v3", "api", version] => crate::openapi::v3_group_version("", version)
            .map(|d| json_response(StatusCode::OK, &d))
            .ok_or_else(ApiError::not_found_path),
        ["openapi", "v3", "apis", group, version] => {
            crate::openapi::v3_group_version(group, version)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(ApiError::not_found_path)
        }
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"]
            if req.method() == Method::POST =>
        {
            Ok(json_response(
                StatusCode::CREATED,
                &self_subject_review(&user),
            ))
        }
        ["apis", "authentication.k8s.io", "v1"] => Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "authentication.k8s.io/v1",
                "resources": [{"name": "selfsubjectreviews", "singularName": "selfsubjectreview",
                    "namespaced": false, "kind": "SelfSubjectReview", "verbs": ["create"]}]}),
        )),
        ["apis", group, version] if served(group, version) => Ok(json_response(
            StatusCode::OK,
            &resource_list(group, version),
        )),
        ["api", "v1", rest @ ..] => resource_request(state, "", "v1", rest, query, req).await,
        ["apis", group, version, rest @ ..] => {
            let (group, version) = (group.to_string(), version.to_string());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            resource_request(state, &group, &version, &rest, query, req).await
        }
        _ => Err(ApiError::not_found_path()),
    }
}

/// Whether the client takes aggregated discovery (apidiscovery.k8s.io/v2) first.
fn wants_aggregated(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split(',').next())
        .is_some_and(|first| {
            let params: Vec<&str> = first.split(';').map(str::trim).collect();
            params.contains(&"g=apidiscovery.k8s.io")
                && params.contains(&"v=v2")
                && params.contains(&"as=APIGroupDiscoveryList")
        })
}

fn served(group: &str, version: &str) -> bool {
    resources::group_versions().contains(&(group, version))
}

fn version() -> Value {
    let (major, minor) = KUBERNETES_VERSION;
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": format!("v{major}.{minor}.0-flotilla.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

fn api_groups() -> Value {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "preferredVersion": versions[0].clone(), "versions": versions})
        })
        .chain(std::iter::once({
            let gv = json!({"groupVersion": "authentication.k8s.io/v1", "version": "v1"});
            json!({"name": "authentication.k8s.io", "versions": [gv.clone()], "preferredVersion": gv})
        }))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Value {
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let list: Vec<Value> = resources::all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| r.discovery())
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("true") | Some("1"))
}

/// Where a request points: a resource, maybe a namespace, maybe one object, maybe one of
/// its subresources (`status`, `scale`, `binding`).
pub struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

impl Target {
    fn status(&self) -> bool {
        self.sub.as_deref() == Some("status")
    }
}

fn target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let find =
        |plural: &str| resources::find(group, version, plural).ok_or_else(ApiError::not_found_path);
    let (namespace, rest) = match rest {
        // `namespaces/<name>/status` is a namespace's own subresource, not a resource in it.
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(ApiError::not_found_path()),
    };
    let resource = find(plural)?;
    // A namespaced resource is named only within a namespace (listed across them too).
    let misplaced = if resource.namespaced {
        namespace.is_none() && name.is_some()
    } else {
        namespace.is_some()
    };
    if misplaced {
        return Err(ApiError::not_found_path());
    }
    if let Some(sub) = &sub {
        if !resource.has(sub) {
            return Err(ApiError::not_found_path());
        }
    }
    Ok(Target {
        resource,
        namespace,
        name,
        sub,
    })
}

async fn resource_request(
    state: &Arc<State>,
    group: &str,
    version: &str,
    rest: &[&str],
    query: HashMap<String, String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let t = target(group, version, rest)?;
    let method = req.method().clone();
    let mut query = query;
    if !query.contains_key("fieldManager") {
        // Kubernetes' default manager: the client program's name from its User-Agent.
        let agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect::<String>();
        query.insert(DEFAULT_MANAGER.into(), agent);
    }
    // A namespaced resource is only listed and watched across namespaces.
    if t.resource.namespaced && t.namespace.is_none() && method != Method::GET {
        return Err(ApiError::method_not_allowed(method.as_str()));
    }
    let as_table = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::table::wanted);
    let content_type = content_type(&req);
    let body = read_body(req).await?;
    if let Some((conversion, stored)) = crate::convert::of(t.resource) {
        let watch = method == Method::GET && t.name.is_none() && is_true(query.get("watch"));
        return crate::convert::serve(
            state,
            t,
            conversion,
            stored,
            &method,
            query,
            &content_type,
            body,
            as_table,
            watch,
        )
        .await;
    }
    serve(state, &t, &method, &query, &content_type, body, as_table).await
}

/// Serves a request for a resource, its body read.
pub async fn serve(
    state: &Arc<State>,
    t: &Target,
    method: &Method,
    query: &HashMap<String, String>,
    content_type: &str,
    body: Bytes,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    match (t.sub.as_deref(), method, &t.name) {
        (Some("scale"), _, Some(name)) => {
            return scale(state, t, name, query, method, content_type, body).await
        }
        (Some("binding"), &Method::POST, Some(name)) => {
            let body = parse_json(content_type, &body)?;
            return bind(state, t, name, body).await;
        }
        (Some("status"), &Method::GET | &Method::PUT | &Method::PATCH, Some(_)) | (None, _, _) => {}
        _ => return Err(ApiError::method_not_allowed(method.as_str())),
    }
    match (method, &t.name) {
        (&Method::GET, Some(name)) => get(state, t, name, as_table).await,
        (&Method::GET, None) if is_true(query.get("watch")) => {
            watch(state, t, query, as_table).await
        }
        (&Method::GET, None) => list(state, t, query, as_table).await,
        (&Method::POST, None) => {
            let body = parse_json(content_type, &body)?;
            create(state, t, body, query).await
        }
        (&Method::PUT, Some(name)) => {
            let body = parse_json(content_type, &body)?;
            update(state, t, name, body, query).await
        }
        (&Method::PATCH, Some(name)) => {
            if content_type.starts_with("application/apply-patch") {
                return server_side_apply(state, t, name, &body, query).await;
            }
            patch_object(state, t, name, content_type, &body, query).await
        }
        (&Method::DELETE, Some(name)) => {
            let options = DeleteOptions::parse(&body, query)?;
            delete(state, t, name, query, &options).await
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

/// The request's Content-Type ("" if none).
fn content_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::too_large(MAX_BODY_BYTES))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// A request body as JSON (or Kubernetes' protobuf envelope), by its Content-Type.
pub fn parse_json(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media != "application/json" && media != crate::protobuf::CONTENT_TYPE && !media.is_empty() {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    if media == crate::protobuf::CONTENT_TYPE {
        return crate::protobuf::decode(body).map_err(|e| {
            ApiError::bad_request(format!("the protobuf body could not be decoded: {e}"))
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type JSON): {e}"
        ))
    })
}

/// The stored object as clients see it: resourceVersion is the key's mod_revision.
fn decode(codec: &crate::crypt::Codec, kv: &KeyValue) -> Result<Value, ApiError> {
    let value = codec.open(&kv.key, &kv.value)?;
    let mut obj: Value = serde_json::from_slice(&value)
        .map_err(|e| ApiError::internal(format!("a stored object is not JSON: {e}")))?;
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(kv.mod_revision.to_string()),
        );
    }
    Ok(obj)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What every object must be before it is written: not too deep, not too large.
fn check_storable(obj: &Value, bytes: usize) -> Result<(), ApiError> {
    if depth(obj) > MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "the object is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    if bytes > MAX_STORED_BYTES {
        return Err(ApiError::too_large(MAX_STORED_BYTES));
    }
    Ok(())
}

fn stored_form(obj: &Value) -> Vec<u8> {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("selfLink");
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}

fn with_revision(mut obj: Value, revision: i64) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    obj
}

async fn get(
    state: &State,
    t: &Target,
    name: &str,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let key = t.resource.key(t.namespace.as_deref(), name);
    match state.store.get(&key).await?.0 {
        Some(kv) if as_table => {
            let meta = json!({"resourceVersion": kv.mod_revision.to_string()});
            let table = crate::table::table(t.resource, &[decode(&state.codec, &kv)?], meta);
            Ok(json_response(StatusCode::OK, &table))
        }
        Some(kv) => Ok(json_response(StatusCode::OK, &decode(&state.codec, &kv)?)),
        None => Err(ApiError::not_found(
            t.resource.plural,
            t.resource.group,
            name,
        )),
    }
}

/// Label selector terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
#[derive(Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn split_terms(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn parse_label_selector(s: &str) -> Result<Vec<Term>, ApiError> {
    let mut terms = Vec::new();
    for raw in split_terms(s) {
        let t = raw.trim();
        let set = |rest: &str| -> Result<Vec<String>, ApiError> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("unable to parse requirement: {t}"))
                })?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let term = if let Some(k) = t.strip_prefix('!') {
            Term::Absent(k.trim().to_string())
        } else if let Some((k, v)) = t.split_once("!=") {
            Term::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once("==") {
            Term::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once('=') {
            Term::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = t.split_once(" notin ") {
            Term::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = t.split_once(" in ") {
            Term::In(k.trim().into(), set(rest)?)
        } else if !t.is_empty() && !t.contains(' ') {
            Term::Exists(t.to_string())
        } else {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: {t}"
            )));
        };
        terms.push(term);
    }
    Ok(terms)
}

fn labels_match(terms: &[Term], obj: &Value) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    terms.iter().all(|t| match t {
        Term::Eq(k, v) => get(k) == Some(v.as_str()),
        Term::Ne(k, v) => get(k) != Some(v.as_str()),
        Term::Exists(k) => get(k).is_some(),
        Term::Absent(k) => get(k).is_none(),
        Term::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Term::NotIn(k, vs) => get(k).map_or(true, |x| !vs.iter().any(|v| v == x)),
    })
}

/// Field selectors: `metadata.name` and `metadata.namespace` with `=`, `==` or `!=`.
fn parse_field_selector(
    s: &str,
    resource: &Resource,
) -> Result<Vec<(String, bool, String)>, ApiError> {
    let mut out = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, eq, value) = if let Some((f, v)) = t.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = t.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = t.split_once('=') {
            (f, true, v)
        } else {
            return Err(ApiError::bad_request(format!(
                "invalid selector: '{t}'; can't understand '{t}'"
            )));
        };
        let field = field.trim();
        if field != "metadata.name"
            && field != "metadata.namespace"
            && !resource.field_labels.contains(&field)
        {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {field}"
            )));
        }
        out.push((field.to_string(), eq, value.trim().to_string()));
    }
    Ok(out)
}

fn fields_match(sel: &[(String, bool, String)], obj: &Value) -> bool {
    sel.iter().all(|(field, eq, value)| {
        let pointer = format!("/{}", field.replace('.', "/"));
        let have = obj.pointer(&pointer).and_then(Value::as_str).unwrap_or("");
        (have == value) == *eq
    })
}

struct Filter {
    labels: Vec<Term>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    /// Whether the filter selects everything.
    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn from_query(q: &HashMap<String, String>, resource: &Resource) -> Result<Filter, ApiError> {
        Ok(Filter {
            labels: parse_label_selector(q.get("labelSelector").map_or("", String::as_str))?,
            fields: parse_field_selector(
                q.get("fieldSelector").map_or("", String::as_str),
                resource,
            )?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        labels_match(&self.labels, obj) && fields_match(&self.fields, obj)
    }
}

/// A continue token: where the next page starts and the revision the list reads at.
fn encode_continue(revision: i64, next_key: &[u8]) -> String {
    let token = json!({"v": 1, "rv": revision, "start": base64::engine::general_purpose::STANDARD.encode(next_key)});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(i64, Vec<u8>), ApiError> {
    let bad = || ApiError::bad_request("continue key is not valid: the token could not be decoded");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_i64().ok_or_else(bad)?;
    let start = base64::engine::general_purpose::STANDARD
        .decode(v["start"].as_str().ok_or_else(bad)?)
        .map_err(|_| bad())?;
    Ok((rv, start))
}

/// Where a list reads: the watch cache at a revision it holds, or the store.
enum ListFrom {
    Cache(i64, crate::watch_cache::Snapshot),
    /// The store, at a revision (0: the latest).
    Store(i64),
}

/// Chooses where a list reads, by Kubernetes' resourceVersion rules: unset is a quorum
/// read (the cache serves it once it has reached the store's current revision), "0" is
/// any state (the cache as it is), N is "not older than N" (or exactly N with
/// `resourceVersionMatch=Exact`, from the store); a continued list reads at its token's
/// revision (a kept snapshot, else the store).
async fn list_source(
    state: &State,
    t: &Target,
    q: &HashMap<String, String>,
    continued: Option<i64>,
) -> Result<ListFrom, ApiError> {
    let cache = state.caches.get(t.resource, &state.store, &state.codec);
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let exact = match q.get("resourceVersionMatch").map(String::as_str) {
        None | Some("") | Some("NotOlderThan") => false,
        Some("Exact") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \
                 \"Exact\", \"NotOlderThan\""
            )))
        }
    };
    if q.get("resourceVersionMatch").is_some_and(|m| !m.is_empty()) && rv.is_empty() {
        return Err(ApiError::bad_request(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless \
             resourceVersion is provided",
        ));
    }
    if let Some(revision) = continued {
        if !rv.is_empty() && rv != "0" {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        return Ok(match cache.snapshot_at(revision) {
            Some(s) => ListFrom::Cache(revision, s),
            None => ListFrom::Store(revision),
        });
    }
    let wanted = match rv {
        "" => state.store.get(&t.resource.prefix(None)).await?.1,
        "0" if exact => {
            return Err(ApiError::bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden \
                 for resourceVersion \"0\"",
            ))
        }
        "0" => 1,
        n => match n.parse::<i64>() {
            Ok(n) if n > 0 && exact => return Ok(ListFrom::Store(n)),
            Ok(n) if n > 0 => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid resourceVersion {n:?}"
                )))
            }
        },
    };
    if cache.caught_up(wanted, CACHE_CATCH_UP).await {
        if let Some((revision, s)) = cache.snapshot() {
            return Ok(ListFrom::Cache(revision, s));
        }
    }
    if !rv.is_empty() && rv != "0" {
        // Not older than a revision the store has not reached: Kubernetes answers 504.
        let current = state.store.get(&t.resource.prefix(None)).await?.1;
        if wanted > current {
            return Err(ApiError::too_large_resource_version(wanted, current));
        }
    }
    Ok(ListFrom::Store(0))
}

/// One page of a list, as the JSON texts of its items (resourceVersion set); with the
/// revision it was read at and where the next page starts, if one follows.
struct Page {
    items: Vec<Bytes>,
    revision: i64,
    next: Option<Vec<u8>>,
}

/// A page from a cache snapshot: up to `limit` (0: all) matching objects under `prefix`
/// from `start`.
fn page_from_snapshot(
    snapshot: &crate::watch_cache::Snapshot,
    revision: i64,
    prefix: &str,
    start: &[u8],
    limit: i64,
    filter: &Filter,
) -> Page {
    let from = if start > prefix.as_bytes() {
        String::from_utf8_lossy(start).into_owned()
    } else {
        prefix.to_string()
    };
    let mut items = Vec::new();
    let mut next = None;
    let mut last: Option<&String> = None;
    for (key, entry) in snapshot.range(from..) {
        if !key.starts_with(prefix) {
            break;
        }
        if limit > 0 && items.len() as i64 >= limit {
            // More follow: the next page starts just after the last key looked at.
            next = last.map(|k| {
                let mut n = k.clone().into_bytes();
                n.push(0);
                n
            });
            break;
        }
        last = Some(key);
        if filter.matches(&entry.selectable) {
            items.push(entry.json.clone());
        }
    }
    Page {
        items,
        revision,
        next,
    }
}

/// A page from the store at `revision` (0: now).
async fn page_from_store(
    state: &State,
    prefix: &str,
    start: &[u8],
    limit: i64,
    revision: i64,
    filter: &Filter,
) -> Result<Page, ApiError> {
    let (kvs, more, read_at) = match state.store.list(prefix, start, limit, revision).await {
        Err(e) if e.code == 410 && revision > 0 && start.is_empty() => {
            return Err(ApiError::gone(
                "The resourceVersion for the provided list is too old.",
            ))
        }
        Err(e) if e.code == 410 && revision > 0 => {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter.",
            ))
        }
        other => other?,
    };
    let mut items = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let value = state.codec.open(&kv.key, &kv.value)?;
        if filter.is_empty() {
            // No selector to read: the stored text goes out with only its resourceVersion
            // added, no object parsed whole.
            if let Some(raw) = raw_with_revision(&value, kv.mod_revision) {
                items.push(Bytes::from(raw));
                continue;
            }
        }
        let obj = decode(&state.codec, kv)?;
        if filter.matches(&obj) {
            items.push(Bytes::from(serde_json::to_vec(&obj).unwrap_or_default()));
        }
    }
    let next = match (more, kvs.last()) {
        (true, Some(last)) => {
            let mut next = last.key.clone();
            next.push(0);
            Some(next)
        }
        _ => None,
    };
    Ok(Page {
        items,
        revision: if revision > 0 { revision } else { read_at },
        next,
    })
}

async fn list(
    state: &State,
    t: &Target,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::from_query(q, t.resource)?;
    let prefix = t.resource.prefix(t.namespace.as_deref());
    let limit: i64 = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 0,
        Some(Ok(l)) if l >= 0 => l.min(MAX_PAGE),
        Some(_) => {
            return Err(ApiError::bad_request(
                "limit must be a non-negative integer",
            ))
        }
    };
    let continued = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, start) = decode_continue(token)?;
            // A token only continues the list it came from.
            if rv <= 0 || !start.starts_with(prefix.as_bytes()) {
                return Err(ApiError::bad_request(
                    "continue key is not valid: it does not belong to this list",
                ));
            }
            Some((rv, start))
        }
        None => None,
    };
    let start = continued.as_ref().map_or(&[][..], |(_, s)| s.as_slice());
    let page = match list_source(state, t, q, continued.as_ref().map(|c| c.0)).await? {
        ListFrom::Cache(revision, snapshot) => {
            let page = page_from_snapshot(&snapshot, revision, &prefix, start, limit, &filter);
            if page.next.is_some() {
                state
                    .caches
                    .get(t.resource, &state.store, &state.codec)
                    .keep(revision, snapshot);
            }
            page
        }
        ListFrom::Store(revision) => {
            page_from_store(state, &prefix, start, limit, revision, &filter).await?
        }
    };
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(next) = &page.next {
        meta["continue"] = Value::String(encode_continue(page.revision, next));
    }
    if as_table {
        let items: Vec<Value> = page
            .items
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect();
        return Ok(json_response(
            StatusCode::OK,
            &crate::table::table(t.resource, &items, meta),
        ));
    }
    let head = json!({
        "kind": format!("{}List", t.resource.kind),
        "apiVersion": t.resource.api_version(),
        "metadata": meta,
    });
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.pop();
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"]}");
    let mut resp = Response::new(Full::new(Bytes::from(out)).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A stored object (JSON) with `metadata.resourceVersion` set, rewritten at the top two
/// levels only; None if it is not an object with an object `metadata`.
fn raw_with_revision(stored: &[u8], revision: i64) -> Option<Vec<u8>> {
    use serde_json::value::RawValue;
    let top: Vec<(String, &RawValue)> =
        serde_json::from_slice::<std::collections::BTreeMap<String, &RawValue>>(stored)
            .ok()?
            .into_iter()
            .collect();
    let mut out = Vec::with_capacity(stored.len() + 32);
    out.push(b'{');
    for (i, (k, v)) in top.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&serde_json::to_vec(k).ok()?);
        out.push(b':');
        if k == "metadata" {
            let mut meta: std::collections::BTreeMap<String, &RawValue> =
                serde_json::from_str(v.get()).ok()?;
            let rv = RawValue::from_string(format!("\"{revision}\"")).ok()?;
            meta.insert("resourceVersion".into(), &rv);
            out.extend_from_slice(&serde_json::to_vec(&meta).ok()?);
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    top.iter().any(|(k, _)| k == "metadata").then_some(out)
}

fn watch_event(kind: &str, object: Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn watch(
    state: &State,
    t: &Target,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let resource = t.resource;
    // With a Table asked for, each event carries a one-row Table.
    let shape = move |obj: Value| -> Value {
        if as_table {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            crate::table::table(resource, &[obj], json!({"resourceVersion": rv}))
        } else {
            obj
        }
    };
    let filter = Filter::from_query(q, t.resource)?;
    let prefix = t.resource.prefix(t.namespace.as_deref());
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(MAX_WATCH)
        .min(MAX_WATCH);
    let permit = state
        .watches
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::too_many_requests())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(WATCH_BUFFER);
    let cache = state.caches.get(t.resource, &state.store, &state.codec);
    // Without a resourceVersion (or "0"), a watch starts with the current objects as ADDED:
    // the cache's, taken together with its feed; read from the store in pages if the
    // cache has not loaded. Changes follow from the next revision.
    let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let (initial, from, mut sub) = if rv.is_empty() || rv == "0" {
        if cache.revision() == 0 {
            cache.caught_up(1, CACHE_CATCH_UP).await;
        }
        match cache.start() {
            Some((revision, snapshot, sub)) => (Initial::Cache(snapshot), revision + 1, Some(sub)),
            None => {
                let revision = state.store.get(&t.resource.prefix(None)).await?.1;
                (Initial::Store(revision), revision + 1, None)
            }
        }
    } else {
        let n = rv
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
        (Initial::None, n.saturating_add(1), None)
    };
    let bookmarks = is_true(q.get("allowWatchBookmarks"));
    // Served from the watch cache when it holds every change since `from`; else from a
    // store watch of its own.
    if sub.is_none() {
        sub = cache.subscribe(from - 1);
    }
    if sub.is_none() && cache.revision() > 0 && from - 1 > cache.revision() {
        // The client read at a revision the cache has not reached yet (other resources'
        // writes move the store's revision on): give it a moment to catch up.
        if cache.caught_up(from - 1, CACHE_CATCH_UP).await {
            sub = cache.subscribe(from - 1);
        }
    }
    let source = match sub {
        Some(sub) => Source::Cache(sub),
        None => {
            let (events, progress) = state.store.watch(&prefix, from).await?;
            Source::Store(events, progress)
        }
    };
    let codec = state.codec.clone();
    let store = state.store.clone();
    let (kind, api_version) = (t.resource.kind, t.resource.api_version());
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let watcher = CacheWatcher {
            cache: &cache,
            after: from - 1,
            filter: &filter,
            prefix: &prefix,
            tx: &tx,
            shape: &shape,
            as_table,
            kind,
            api_version: &api_version,
        };
        if let Initial::Cache(snapshot) = &initial {
            if !watcher.initial(snapshot, deadline.as_mut()).await {
                return;
            }
        }
        if let Initial::Store(revision) = initial {
            let mut start: Vec<u8> = Vec::new();
            loop {
                let page = tokio::select! {
                    p = store.list(&prefix, &start, WATCH_PAGE, revision) => p,
                    _ = &mut deadline => return,
                };
                let (kvs, more) = match page {
                    Ok((kvs, more, _)) => (kvs, more),
                    Err(e) => {
                        let _ = tx.send(watch_event("ERROR", e.to_status())).await;
                        return;
                    }
                };
                for kv in &kvs {
                    let Ok(obj) = decode(&codec, kv) else {
                        continue;
                    };
                    if filter.matches(&obj)
                        && tx.send(watch_event("ADDED", shape(obj))).await.is_err()
                    {
                        return;
                    }
                }
                match (more, kvs.last()) {
                    (true, Some(last)) => {
                        start = last.key.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
        }
        let (mut events, progress) = match source {
            Source::Cache(sub) => {
                watcher.run(sub, bookmarks, deadline).await;
                return;
            }
            Source::Store(events, progress) => (events, progress),
        };
        // Bookmarks about once a minute when asked for: the store reports the revision it has
        // reached, which becomes the BOOKMARK's resourceVersion.
        let mut bookmark_tick = tokio::time::interval(BOOKMARK_INTERVAL);
        bookmark_tick.tick().await;
        loop {
            let msg = tokio::select! {
                m = events.message() => m,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = bookmark_tick.tick(), if bookmarks => {
                    progress.request();
                    continue;
                }
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let err = ApiError::internal(format!("watch: {}", e.message()));
                    let _ = tx.send(watch_event("ERROR", err.to_status())).await;
                    return;
                }
            };
            if resp.canceled {
                let err = if resp.compact_revision > 0 {
                    ApiError::gone(format!(
                        "too old resource version: {} ({})",
                        from - 1,
                        resp.compact_revision
                    ))
                } else {
                    ApiError::internal(format!("watch cancelled: {}", resp.cancel_reason))
                };
                let _ = tx.send(watch_event("ERROR", err.to_status())).await;
                return;
            }
            if resp.events.is_empty() {
                if bookmarks && !resp.created {
                    if let Some(h) = &resp.header {
                        let mark = json!({
                            "kind": kind,
                            "apiVersion": api_version,
                            "metadata": {"resourceVersion": h.revision.to_string()},
                        });
                        if tx.send(watch_event("BOOKMARK", mark)).await.is_err() {
                            return;
                        }
                    }
                }
                continue;
            }
            for ev in resp.events {
                let prev = ev.prev_kv.as_ref().and_then(|p| decode(&codec, p).ok());
                let prev_matched = prev.as_ref().is_some_and(|p| filter.matches(p));
                let (kind, obj) = if ev.r#type == EventType::Delete as i32 {
                    let (Some(prev), Some(kv)) = (prev, ev.kv.as_ref()) else {
                        continue;
                    };
                    if !prev_matched {
                        continue;
                    }
                    ("DELETED", with_revision(prev, kv.mod_revision))
                } else {
                    let Some(kv) = ev.kv.as_ref() else { continue };
                    let Ok(obj) = decode(&codec, kv) else {
                        continue;
                    };
                    // Entering or leaving a selector's set is an ADDED or DELETED for the
                    // watcher, as Kubernetes' watch cache reports it.
                    match (filter.matches(&obj), prev_matched) {
                        (true, true) => ("MODIFIED", obj),
                        (true, false) => ("ADDED", obj),
                        (false, true) => ("DELETED", obj),
                        (false, false) => continue,
                    }
                };
                // A watcher that does not keep up is cut off; it re-watches from its last
                // resourceVersion.
                if tx.try_send(watch_event(kind, shape(obj))).is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

use futures::StreamExt;

/// What a watch sends before its changes.
enum Initial {
    /// Nothing: it starts after a resourceVersion.
    None,
    /// The cache's objects.
    Cache(crate::watch_cache::Snapshot),
    /// The store's objects at a revision.
    Store(i64),
}

/// Where a watch's changes come from.
enum Source {
    Cache(crate::watch_cache::Subscription),
    Store(
        tonic::Streaming<flotilla_proto::etcdserverpb::WatchResponse>,
        crate::etcd::ProgressRequester,
    ),
}

/// One client watch fed by the watch cache.
struct CacheWatcher<'a, F: Fn(Value) -> Value> {
    cache: &'a crate::watch_cache::Cache,
    /// The revision the watch starts after.
    after: i64,
    filter: &'a Filter,
    /// The watch's key prefix (the resource's, or one namespace's).
    prefix: &'a str,
    tx: &'a tokio::sync::mpsc::Sender<Bytes>,
    shape: &'a F,
    /// Events carry one-row Tables (`shape` makes them) instead of the objects' text.
    as_table: bool,
    kind: &'static str,
    api_version: &'a str,
}

impl<F: Fn(Value) -> Value> CacheWatcher<'_, F> {
    /// The event a change is for this watcher, if any (selector transitions as ADDED and
    /// DELETED, as with a store watch).
    fn event(&self, c: &crate::watch_cache::Change) -> Option<Bytes> {
        if !c.key.starts_with(self.prefix) {
            return None;
        }
        let prev_matched = c
            .prev
            .as_ref()
            .is_some_and(|p| self.filter.matches(&p.selectable));
        let kind = if c.deleted {
            if !prev_matched {
                return None;
            }
            "DELETED"
        } else {
            match (self.filter.matches(&c.object.selectable), prev_matched) {
                (true, true) => "MODIFIED",
                (true, false) => "ADDED",
                (false, true) => "DELETED",
                (false, false) => return None,
            }
        };
        Some(self.encode(kind, &c.object))
    }

    fn encode(&self, kind: &str, entry: &crate::watch_cache::Entry) -> Bytes {
        if self.as_table {
            return watch_event(kind, (self.shape)(entry.object()));
        }
        let mut line = Vec::with_capacity(entry.json.len() + 32);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(kind.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(&entry.json);
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }

    /// Sends every object of `snapshot` the watch selects as ADDED; false if the watch
    /// ended meanwhile.
    async fn initial(
        &self,
        snapshot: &crate::watch_cache::Snapshot,
        mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> bool {
        for (key, entry) in snapshot.range(self.prefix.to_string()..) {
            if !key.starts_with(self.prefix) {
                break;
            }
            if !self.filter.matches(&entry.selectable) {
                continue;
            }
            tokio::select! {
                sent = self.tx.send(self.encode("ADDED", entry)) => if sent.is_err() { return false },
                _ = &mut deadline => return false,
            }
        }
        true
    }

    async fn run(
        &self,
        sub: crate::watch_cache::Subscription,
        bookmarks: bool,
        mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
    ) {
        use crate::watch_cache::Item;
        use tokio::sync::broadcast::error::RecvError;
        // Delivered so far: the highest revision, and the keys changed at it (a revision may
        // change several keys; a resumed feed must not repeat or skip any).
        let mut seen = self.after;
        let mut at_seen: Vec<String> = Vec::new();
        // Whether every change at `seen` was delivered (true at the start: the watch begins
        // after `after`; and after a progress notification).
        let mut all_at_seen = true;
        let mut backlog = sub.backlog;
        let mut live = sub.live;
        let mut bookmark_tick = tokio::time::interval(BOOKMARK_INTERVAL);
        bookmark_tick.tick().await;
        loop {
            for c in std::mem::take(&mut backlog) {
                if c.revision < seen || (c.revision == seen && at_seen.contains(&c.key)) {
                    continue;
                }
                if c.revision > seen {
                    seen = c.revision;
                    at_seen.clear();
                    all_at_seen = false;
                }
                at_seen.push(c.key.clone());
                if let Some(ev) = self.event(&c) {
                    tokio::select! {
                        sent = self.tx.send(ev) => if sent.is_err() { return },
                        _ = &mut deadline => return,
                    }
                }
            }
            let item = tokio::select! {
                i = live.recv() => i,
                _ = &mut deadline => return,
                _ = self.tx.closed() => return,
                _ = bookmark_tick.tick(), if bookmarks && seen > 0 => {
                    let mark = json!({
                        "kind": self.kind,
                        "apiVersion": self.api_version,
                        "metadata": {"resourceVersion": seen.to_string()},
                    });
                    if self.tx.send(watch_event("BOOKMARK", mark)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            match item {
                Ok(Item::Change(c)) => backlog.push(c),
                Ok(Item::Progress(r)) => {
                    if r > seen {
                        seen = r;
                        at_seen.clear();
                    }
                    if r >= seen {
                        all_at_seen = true;
                    }
                }
                // Fallen behind the live feed: resume from the window, if it still reaches
                // back far enough; else the client re-watches. Changes at `seen` are asked
                // for again only if some may not have been delivered (those that were are
                // skipped by key).
                Err(RecvError::Lagged(_)) => {
                    match self
                        .cache
                        .subscribe(if all_at_seen { seen } else { seen - 1 })
                    {
                        Some(again) => {
                            backlog = again.backlog;
                            live = again.live;
                        }
                        None => return,
                    }
                }
                // The cache started over (its store watch broke): the client re-watches.
                Err(RecvError::Closed) => return,
            }
        }
    }
}

fn random_suffix(n: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn new_uid() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Checks what any write of an object needs: it is an object of this resource's kind and
/// apiVersion, in the request's namespace.
fn check_object(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
    let r = t.resource;
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the object provided is not a JSON object",
        ));
    };
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            return Err(ApiError::bad_request(
                "Object 'Kind' is missing in the request body",
            ))
        }
        Some(k) if k != r.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind {k:?} of the object does not match the resource {} ({})",
                r.plural, r.kind
            )))
        }
        _ => {}
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v == r.api_version() => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "the API version {:?} of the object does not match the request's {}",
                other.unwrap_or(""),
                r.api_version()
            )))
        }
    }
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return Err(ApiError::bad_request("metadata must be an object"));
    };
    if r.namespaced {
        let ns = t.namespace.clone().unwrap_or_default();
        match meta.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("namespace".into(), Value::String(ns));
            }
            Some(have) if have != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => {}
        }
    } else {
        meta.remove("namespace");
    }
    Ok(())
}

/// What the server sets on write, per resource (secrets' stringData, namespaces' phase).
fn normalize(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
    match t.resource.plural {
        "secrets" => {
            if let Some(Value::Object(string_data)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                let data = obj
                    .as_object_mut()
                    .map(|m| m.entry("data").or_insert_with(|| Value::Object(Map::new())));
                if let Some(Value::Object(data)) = data {
                    for (k, v) in string_data {
                        let s = v.as_str().unwrap_or_default();
                        data.insert(
                            k,
                            Value::String(base64::engine::general_purpose::STANDARD.encode(s)),
                        );
                    }
                }
            }
            if obj.get("type").is_none() {
                obj["type"] = Value::String("Opaque".into());
            }
        }
        "namespaces" => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        _ => {}
    }
    Ok(())
}

/// `fieldValidation`: unknown fields are always dropped (as Kubernetes' typed decoding
/// does); Strict refuses them, Warn (the default) reports them in `Warning` headers.
fn field_validation(
    t: &Target,
    obj: &mut Value,
    q: &HashMap<String, String>,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = t.resource.schema() else {
        return Ok(Vec::new());
    };
    let found = crate::schema::check(obj, &schema);
    if !found.wrong.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: {}",
            found.wrong.join(", "),
            kind = t.resource.kind,
            version = t.resource.version,
        )));
    }
    let unknown = found.unknown;
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let listed: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match q.get("fieldValidation").map(String::as_str) {
        Some("Strict") => Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            listed.join(", "),
            kind = t.resource.kind,
            version = t.resource.version,
        ))),
        Some("Ignore") => Ok(Vec::new()),
        None | Some("Warn") | Some("") => Ok(listed),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation must be Ignore, Warn or Strict, not {other:?}"
        ))),
    }
}

/// What a write changes beyond its object: a CRD written changes what this server serves
/// (the others follow through their watch).
async fn after_write(state: &State, t: &Target) {
    if t.resource.plural == "customresourcedefinitions" {
        if let Err(e) = crate::crd::refresh(&state.store, &state.codec).await {
            tracing::warn!(error = %e, "reading CustomResourceDefinitions after a change");
        }
    }
}

/// A deleted CRD's objects go with it: deleted in the background, retried until done.
fn delete_custom_objects(state: &State, crd: &Value) {
    let (group, plural) = (
        crd.pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or(""),
        crd.pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or(""),
    );
    if group.is_empty() || plural.is_empty() {
        return;
    }
    let (store, prefix) = (state.store.clone(), format!("/registry/{group}/{plural}/"));
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(200);
        while let Err(e) = store.delete_prefix(&prefix).await {
            tracing::warn!(%prefix, error = %e, "deleting a CRD's objects; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    });
}

/// Where the User-Agent's manager name waits for a request that names none.
const DEFAULT_MANAGER: &str = " manager";

/// Who a write is recorded as (managedFields).
fn writer(t: &Target, q: &HashMap<String, String>) -> crate::apply::Writer {
    let manager = q
        .get("fieldManager")
        .or_else(|| q.get(DEFAULT_MANAGER))
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    crate::apply::Writer {
        manager,
        api_version: t.resource.api_version(),
        subresource: t.sub.clone().unwrap_or_default(),
    }
}

/// PATCH with `application/apply-patch+yaml`: server-side apply. The body is the applied
/// configuration (kubectl sends it as JSON, which YAML includes); without the object it
/// creates it.
async fn server_side_apply(
    state: &State,
    t: &Target,
    name: &str,
    body: &[u8],
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    if !q.contains_key("fieldManager") {
        return Err(ApiError::bad_request(
            "PATCH, fieldManager: Required value: is required for apply patch",
        ));
    }
    let mut applied: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the apply configuration could not be read (send it as JSON): {e}"
        ))
    })?;
    check_object(t, &mut applied)?;
    let warnings = field_validation(t, &mut applied, q)?;
    if name_of(&applied).as_deref() != Some(name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let force = is_true(q.get("force"));
    let w = writer(t, q);
    let key = t.resource.key(t.namespace.as_deref(), name);
    for _ in 0..5 {
        let (current, _) = state.store.get(&key).await?;
        let Some(current) = current else {
            if t.status() {
                return Err(ApiError::not_found(
                    t.resource.plural,
                    t.resource.group,
                    name,
                ));
            }
            let obj = crate::apply::apply(None, &applied, t.resource.kind, &w, force)?;
            match create_checked(state, t, obj, q, true).await {
                Err(e) if e.reason == "AlreadyExists" => continue,
                other => return other.map(|r| with_warnings(r, &warnings)),
            }
        };
        let old = decode(&state.codec, &current)?;
        let obj = crate::apply::apply(Some(&old), &applied, t.resource.kind, &w, force)?;
        match write_object(
            state,
            t,
            name,
            &key,
            old,
            obj,
            current.mod_revision,
            q,
            false,
        )
        .await
        {
            Err(e)
                if e.reason == "Conflict"
                    && e.details
                        .as_ref()
                        .is_some_and(|d| d.get("causes").is_none()) =>
            {
                continue
            }
            Err(e) => return Err(e),
            Ok(written) => {
                return Ok(with_warnings(
                    json_response(StatusCode::OK, &written),
                    &warnings,
                ))
            }
        }
    }
    Err(ApiError::conflict(
        t.resource.plural,
        t.resource.group,
        name,
    ))
}

/// Kinds whose `metadata.generation` counts changes to what the object asks for (kinds
/// with a status written apart from it).
fn tracks_generation(r: &Resource) -> bool {
    (r.has("status") || r.is_custom()) && r.plural != "namespaces"
}

/// Everything but metadata and status: what a generation counts changes of.
fn spec_of(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// Kubernetes' validation of the kind: 422 Invalid listing every bad field.
fn check_valid(t: &Target, name: &str, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let causes = crate::kinds::validate(t.resource.kind, obj, old);
    if causes.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        t.resource.kind,
        t.resource.group,
        name,
        causes,
    ))
}

/// Adds `Warning` headers (RFC 7234 code 299, as Kubernetes sends them).
fn with_warnings(mut resp: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = header::HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn name_of(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn check_name(t: &Target, name: &str) -> Result<(), ApiError> {
    t.resource.check_name(name).map_err(|msg| {
        ApiError::invalid(
            t.resource.kind,
            t.resource.group,
            name,
            vec![(
                "metadata.name".into(),
                format!("Invalid value: \"{name}\": {msg}"),
            )],
        )
    })
}

async fn namespace_exists(state: &State, t: &Target, name: &str) -> Result<(), ApiError> {
    let Some(ns) = &t.namespace else {
        return Ok(());
    };
    let key = resources::find("", "v1", "namespaces")
        .map(|r| r.key(None, ns))
        .unwrap_or_default();
    let Some(kv) = state.store.get(&key).await?.0 else {
        return Err(ApiError::not_found("namespaces", "", ns));
    };
    let namespace = decode(&state.codec, &kv)?;
    if namespace.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(
            t.resource.plural,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        ));
    }
    Ok(())
}

/// Deletes everything in a Terminating namespace, then the namespace. Retried until done;
/// any apiserver may do it (deletes are idempotent), and start-up resumes unfinished ones.
pub async fn finalize_namespace(state: Arc<State>, ns: String) {
    let mut pause = Duration::from_millis(200);
    loop {
        match finalize_once(&state, &ns).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "finishing a namespace deletion; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn finalize_once(state: &State, ns: &str) -> Result<(), ApiError> {
    for r in resources::all().into_iter().filter(|r| r.namespaced) {
        let prefix = r.prefix(Some(ns));
        if r.plural == "services" {
            let mut start = Vec::new();
            loop {
                let (kvs, more, _) = state.store.list(&prefix, &start, 500, 0).await?;
                for kv in &kvs {
                    if let Ok(obj) = decode(&state.codec, kv) {
                        let name = obj
                            .pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        crate::services::release(&state.store, &obj, &format!("{ns}/{name}")).await;
                    }
                }
                match (more, kvs.last()) {
                    (true, Some(last)) => {
                        start = last.key.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
        }
        state.store.delete_prefix(&prefix).await?;
    }
    let Some(r) = resources::find("", "v1", "namespaces") else {
        return Ok(());
    };
    let key = r.key(None, ns);
    if let (Some(kv), _) = state.store.get(&key).await? {
        let obj = decode(&state.codec, &kv)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            state.store.delete_if(&key, kv.mod_revision).await?;
        }
    }
    Ok(())
}

/// Namespaces left Terminating (an apiserver stopped mid-way): finish them.
pub async fn resume_namespace_deletions(state: Arc<State>) -> Result<(), ApiError> {
    let Some(r) = resources::find("", "v1", "namespaces") else {
        return Ok(());
    };
    let (kvs, _, _) = state.store.list(&r.prefix(None), &[], 0, 0).await?;
    for kv in &kvs {
        let obj = decode(&state.codec, kv)?;
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            if let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str) {
                tokio::spawn(finalize_namespace(state.clone(), name.to_string()));
            }
        }
    }
    Ok(())
}

fn dry_run(q: &HashMap<String, String>) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

async fn create(
    state: &State,
    t: &Target,
    mut obj: Value,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    check_object(t, &mut obj)?;
    let warnings = field_validation(t, &mut obj, q)?;
    create_checked(state, t, obj, q, false)
        .await
        .map(|r| with_warnings(r, &warnings))
}

async fn create_checked(
    state: &State,
    t: &Target,
    mut obj: Value,
    q: &HashMap<String, String>,
    applied: bool,
) -> Result<Response<Body>, ApiError> {
    let name = match name_of(&obj) {
        Some(n) => n,
        None => match obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(base) if !base.is_empty() => {
                let name = format!("{base}{}", random_suffix(5));
                obj["metadata"]["name"] = Value::String(name.clone());
                name
            }
            _ => {
                return Err(ApiError::invalid(
                    t.resource.kind,
                    t.resource.group,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ))
            }
        },
    };
    check_name(t, &name)?;
    namespace_exists(state, t, &name).await?;
    normalize(t, &mut obj)?;
    crate::kinds::default(t.resource.kind, &mut obj);
    let meta = &mut obj["metadata"];
    meta["uid"] = Value::String(new_uid());
    meta["creationTimestamp"] = Value::String(now_rfc3339());
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("generation");
    }
    if tracks_generation(t.resource) {
        obj["metadata"]["generation"] = json!(1);
    }
    crate::kinds::on_create(t.resource.kind, &mut obj, t.resource.has("status"));
    if !applied {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        crate::apply::record_update(None, &mut obj, t.resource.kind, &writer(t, q));
    }
    check_valid(t, &name, &obj, None)?;
    let key = t.resource.key(t.namespace.as_deref(), &name);
    if state.store.get(&key).await?.0.is_some() {
        return Err(ApiError::already_exists(
            t.resource.plural,
            t.resource.group,
            &name,
        ));
    }
    check_storable(&obj, stored_form(&obj).len())?;
    let claimed = if t.resource.plural == "services" {
        let ns = t.namespace.clone().unwrap_or_default();
        crate::services::on_create(&state.store, &state.service_range, &mut obj, &ns, &name).await?
    } else {
        Vec::new()
    };
    let owner = format!("{}/{name}", t.namespace.as_deref().unwrap_or(""));
    if dry_run(q) {
        crate::services::free_all(&state.store, &claimed, &owner).await;
        return Ok(json_response(StatusCode::CREATED, &obj));
    }
    let (plural, group) = (t.resource.plural, t.resource.group);
    let revision = store_object(state, t, &key, &obj, 0, &claimed, &owner, |_| {
        ApiError::already_exists(plural, group, &name)
    })
    .await?;
    after_write(state, t).await;
    Ok(json_response(
        StatusCode::CREATED,
        &with_revision(obj, revision),
    ))
}

/// Writes `obj` at `key` if the key's mod_revision is `expected` (0: absent), sealed and
/// leased as its kind needs; returns the new revision. A failed condition becomes
/// `on_conflict(whether the key exists)`. Allocations `claimed` for the write are freed when
/// it certainly did not happen (a store that could not say, 503, keeps them).
#[allow(clippy::too_many_arguments)]
async fn store_object(
    state: &State,
    t: &Target,
    key: &str,
    obj: &Value,
    expected: i64,
    claimed: &[String],
    owner: &str,
    on_conflict: impl FnOnce(bool) -> ApiError,
) -> Result<i64, ApiError> {
    let written = match state.codec.seal(t.resource.plural, key, stored_form(obj)) {
        Ok(sealed) => match lease_for(state, t).await {
            Ok(lease) => {
                state
                    .store
                    .put_if_leased(key, sealed, expected, lease)
                    .await
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let e = match written {
        Ok(Written::Done { revision }) => return Ok(revision),
        Ok(Written::Conflict(current)) => on_conflict(current.is_some()),
        Err(e) => e,
    };
    note_lost_lease(state, &e);
    if e.code != 503 {
        crate::services::free_all(&state.store, claimed, owner).await;
    }
    Err(e)
}

/// Replaces an object. A resourceVersion in the body must match the stored one (409
/// otherwise); without one the write is unconditional (still atomic against the read).
async fn update(
    state: &State,
    t: &Target,
    name: &str,
    mut obj: Value,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    check_object(t, &mut obj)?;
    let warnings = field_validation(t, &mut obj, q)?;
    if name_of(&obj).as_deref() != Some(name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    let key = t.resource.key(t.namespace.as_deref(), name);
    let (current, _) = state.store.get(&key).await?;
    let Some(current) = current else {
        return Err(ApiError::not_found(
            t.resource.plural,
            t.resource.group,
            name,
        ));
    };
    let expected = match obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) if !rv.is_empty() => rv
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        _ => current.mod_revision,
    };
    let old = decode(&state.codec, &current)?;
    write_back(state, t, name, &key, old, obj, expected, q)
        .await
        .map(|r| with_warnings(r, &warnings))
}

/// `write_object`, answered with the object written.
#[allow(clippy::too_many_arguments)]
async fn write_back(
    state: &State,
    t: &Target,
    name: &str,
    key: &str,
    old: Value,
    obj: Value,
    expected: i64,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let written = write_object(state, t, name, key, old, obj, expected, q, true).await?;
    Ok(json_response(StatusCode::OK, &written))
}

/// Writes `obj` over `old` (whose mod_revision must still be `expected`), keeping what
/// clients may not change (uid, creationTimestamp, generation, the status or all but it);
/// returns the object as written.
#[allow(clippy::too_many_arguments)]
async fn write_object(
    state: &State,
    t: &Target,
    name: &str,
    key: &str,
    old: Value,
    mut obj: Value,
    expected: i64,
    q: &HashMap<String, String>,
    record: bool,
) -> Result<Value, ApiError> {
    normalize(t, &mut obj)?;
    if t.status() {
        // A status write changes the status only (and, for an apply, who owns it).
        let status = obj.get("status").cloned().unwrap_or(Value::Null);
        let managed = obj.pointer("/metadata/managedFields").cloned();
        obj = old.clone();
        obj["status"] = status;
        if let (false, Some(m)) = (record, managed) {
            obj["metadata"]["managedFields"] = m;
        }
    } else {
        if t.resource.has("status") {
            // ...and any other write everything but the status.
            match old.get("status") {
                Some(status) => obj["status"] = status.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        crate::kinds::default(t.resource.kind, &mut obj);
    }
    // What only the server sets.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        let meta = &mut obj["metadata"];
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => meta[field] = v.clone(),
            None => {
                if let Some(m) = meta.as_object_mut() {
                    m.remove(field);
                }
            }
        }
    }
    if tracks_generation(t.resource) && spec_of(&old) != spec_of(&obj) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        obj["metadata"]["generation"] = json!(generation + 1);
    }
    if record {
        crate::apply::record_update(Some(&old), &mut obj, t.resource.kind, &writer(t, q));
    }
    if !t.status() {
        check_valid(t, name, &obj, Some(&old))?;
    }
    check_storable(&obj, stored_form(&obj).len())?;
    let (claimed, dropped) = if t.resource.plural == "services" {
        let ns = t.namespace.clone().unwrap_or_default();
        crate::services::on_update(
            &state.store,
            &state.service_range,
            &old,
            &mut obj,
            &ns,
            name,
        )
        .await?
    } else {
        (Vec::new(), Vec::new())
    };
    let owner = format!("{}/{name}", t.namespace.as_deref().unwrap_or(""));
    if dry_run(q) {
        crate::services::free_all(&state.store, &claimed, &owner).await;
        return Ok(obj);
    }
    let (plural, group) = (t.resource.plural, t.resource.group);
    // An object being deleted whose last finalizer is gone goes, unless it is in a grace
    // period (a pod its node is stopping: the node deletes it when done).
    let finalized = obj.pointer("/metadata/deletionTimestamp").is_some()
        && obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && old
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0;
    if finalized && plural != "namespaces" {
        // The last finalizer of an object being deleted is gone: the object goes.
        return match state.store.delete_if(key, expected).await? {
            Written::Done { .. } => {
                if plural == "services" {
                    crate::services::release(&state.store, &old, &owner).await;
                }
                if plural == "customresourcedefinitions" {
                    delete_custom_objects(state, &old);
                }
                after_write(state, t).await;
                Ok(obj)
            }
            Written::Conflict(current) => Err(if current.is_some() {
                ApiError::conflict(plural, group, name)
            } else {
                ApiError::not_found(plural, group, name)
            }),
        };
    }
    let revision = store_object(state, t, key, &obj, expected, &claimed, &owner, |exists| {
        if exists {
            ApiError::conflict(plural, group, name)
        } else {
            ApiError::not_found(plural, group, name)
        }
    })
    .await?;
    crate::services::free_all(&state.store, &dropped, &owner).await;
    after_write(state, t).await;
    Ok(with_revision(obj, revision))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PatchType {
    Merge,
    Strategic,
    Json,
}

fn parse_patch(content_type: &str, patch: &[u8]) -> Result<(PatchType, Value), ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let patch_type = match media {
        "application/merge-patch+json" => PatchType::Merge,
        "application/strategic-merge-patch+json" => PatchType::Strategic,
        "application/json-patch+json" => PatchType::Json,
        _ => return Err(ApiError::unsupported_media_type(content_type)),
    };
    let patch: Value = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    Ok((patch_type, patch))
}

fn apply_patch(
    t: &Target,
    name: &str,
    obj: &mut Value,
    patch_type: PatchType,
    patch: &Value,
) -> Result<(), ApiError> {
    let applied = match patch_type {
        PatchType::Strategic => crate::patch::strategic(obj, patch, t.resource.kind),
        PatchType::Json => crate::patch::json_patch(obj, patch),
        PatchType::Merge => {
            crate::patch::merge(obj, patch);
            Ok(())
        }
    };
    applied.map_err(|e| {
        ApiError::invalid(
            t.resource.kind,
            t.resource.group,
            name,
            vec![(
                "patch".into(),
                format!("Invalid value: the patch does not apply: {e}"),
            )],
        )
    })
}

async fn patch_object(
    state: &State,
    t: &Target,
    name: &str,
    content_type: &str,
    patch: &[u8],
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let (patch_type, patch) = parse_patch(content_type, patch)?;
    let key = t.resource.key(t.namespace.as_deref(), name);
    let (plural, group) = (t.resource.plural, t.resource.group);
    // Retried on a concurrent change: the patch applies to whatever is current, unless it
    // names a resourceVersion itself (a precondition).
    for _ in 0..5 {
        let (current, _) = state.store.get(&key).await?;
        let Some(current) = current else {
            return Err(ApiError::not_found(plural, group, name));
        };
        let old = decode(&state.codec, &current)?;
        let mut obj = old.clone();
        apply_patch(t, name, &mut obj, patch_type, &patch)?;
        check_object(t, &mut obj)?;
        let warnings = field_validation(t, &mut obj, q)?;
        if name_of(&obj).as_deref() != Some(name) {
            return Err(ApiError::bad_request(
                "a patch may not change the object's name",
            ));
        }
        let now = current.mod_revision.to_string();
        let precondition = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|rv| *rv != now)
            .map(|rv| {
                rv.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))
            })
            .transpose()?;
        let expected = precondition.unwrap_or(current.mod_revision);
        match write_back(state, t, name, &key, old, obj, expected, q).await {
            Err(e) if e.reason == "Conflict" && precondition.is_none() => continue,
            other => return other.map(|r| with_warnings(r, &warnings)),
        }
    }
    Err(ApiError::conflict(plural, group, name))
}

/// A DELETE's options, from its body (DeleteOptions) or query.
#[derive(Default)]
struct DeleteOptions {
    uid: Option<String>,
    resource_version: Option<String>,
    /// Seconds a pod is given to stop (None: its own terminationGracePeriodSeconds).
    grace_period: Option<i64>,
}

impl DeleteOptions {
    fn parse(body: &[u8], q: &HashMap<String, String>) -> Result<DeleteOptions, ApiError> {
        let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
            })?
        };
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let propagation = text(&body["propagationPolicy"])
            .or_else(|| q.get("propagationPolicy").cloned())
            .or_else(|| match body.get("orphanDependents") {
                Some(Value::Bool(true)) => Some("Orphan".into()),
                _ => None,
            });
        if let Some(p) = &propagation {
            if !["Orphan", "Background", "Foreground"].contains(&p.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy: Unsupported value: \"{p}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
                )));
            }
        }
        // (propagationPolicy is checked; every policy deletes at once for now, see `delete`.)
        let grace_period = match (&body["gracePeriodSeconds"], q.get("gracePeriodSeconds")) {
            (Value::Null, None) => None,
            (Value::Null, Some(g)) => Some(g.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("gracePeriodSeconds: invalid value {g:?}"))
            })?),
            (v, _) => Some(v.as_i64().ok_or_else(|| {
                ApiError::bad_request(format!("gracePeriodSeconds: invalid value {v}"))
            })?),
        };
        Ok(DeleteOptions {
            grace_period,
            uid: text(&body["preconditions"]["uid"]),
            resource_version: text(&body["preconditions"]["resourceVersion"]),
        })
    }
}

async fn delete(
    state: &Arc<State>,
    t: &Target,
    name: &str,
    q: &HashMap<String, String>,
    options: &DeleteOptions,
) -> Result<Response<Body>, ApiError> {
    if t.resource.plural == "namespaces"
        && ["default", "kube-system", "kube-public"].contains(&name)
    {
        return Err(ApiError::forbidden(
            "namespaces",
            name,
            "this namespace may not be deleted",
        ));
    }
    let key = t.resource.key(t.namespace.as_deref(), name);
    for _ in 0..5 {
        let (current, _) = state.store.get(&key).await?;
        let Some(current) = current else {
            return Err(ApiError::not_found(
                t.resource.plural,
                t.resource.group,
                name,
            ));
        };
        let mut obj = decode(&state.codec, &current)?;
        let uid = obj.pointer("/metadata/uid").and_then(Value::as_str);
        if options.uid.as_deref().is_some_and(|want| Some(want) != uid) {
            return Err(ApiError::conflict_because(
                t.resource.plural,
                t.resource.group,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                    options.uid.as_deref().unwrap_or(""),
                    uid.unwrap_or("")
                ),
            ));
        }
        let now = current.mod_revision.to_string();
        if let Some(rv) = options.resource_version.as_deref().filter(|rv| *rv != now) {
            return Err(ApiError::conflict_because(
                t.resource.plural,
                t.resource.group,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {now}"
                ),
            ));
        }
        if dry_run(q) {
            return Ok(json_response(StatusCode::OK, &obj));
        }
        if t.resource.plural == "pods" {
            let mut grace = pod_grace_period(&obj, options.grace_period);
            if grace > 0 && !node_exists(state, &obj).await? {
                // Nothing runs a pod bound to a node that does not exist (Kubernetes' pod
                // garbage collector deletes such pods too).
                grace = 0;
            }
            let meta = &mut obj["metadata"];
            let marked = meta.get("deletionTimestamp").is_some_and(|v| !v.is_null());
            let old_grace = meta["deletionGracePeriodSeconds"].as_i64().unwrap_or(0);
            if marked && grace >= old_grace {
                // A second delete may shorten the grace period, never lengthen it.
                if grace > 0 {
                    return Ok(json_response(
                        StatusCode::OK,
                        &with_revision(obj, current.mod_revision),
                    ));
                }
            } else if grace > 0 {
                // A pod on a node is marked and given its grace period: the node's agent
                // stops its containers, then deletes it for good (grace 0).
                let requested_at = match meta["deletionTimestamp"].as_str() {
                    Some(at) => chrono::DateTime::parse_from_rfc3339(at)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .unwrap_or_else(|_| chrono::Utc::now())
                        .checked_sub_signed(
                            chrono::TimeDelta::try_seconds(old_grace).unwrap_or_default(),
                        )
                        .unwrap_or_else(chrono::Utc::now),
                    None => chrono::Utc::now(),
                };
                let due = requested_at
                    .checked_add_signed(chrono::TimeDelta::try_seconds(grace).unwrap_or_default())
                    .unwrap_or(requested_at);
                meta["deletionTimestamp"] =
                    Value::String(due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                meta["deletionGracePeriodSeconds"] = json!(grace);
                match write_marked(state, t, &key, obj, current.mod_revision).await? {
                    Some(answer) => return Ok(answer),
                    None => continue,
                }
            }
            if marked {
                // Grace 0 on a marked pod: it goes now, or once its finalizers are gone.
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
        }
        // Orphan and Foreground deletions are Kubernetes' `orphan` and `foregroundDeletion`
        // finalizers, which a garbage collector acts on. None runs yet, so they delete at
        // once, as Background does (dependents stay, as with Orphan).
        let finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if t.resource.plural != "namespaces" && !finalizers.is_empty() {
            // An object with finalizers is marked and stays until they are all removed.
            let meta = &mut obj["metadata"];
            meta["finalizers"] = Value::Array(finalizers);
            if meta.get("deletionTimestamp").is_none() {
                meta["deletionTimestamp"] = Value::String(now_rfc3339());
                meta["deletionGracePeriodSeconds"] = json!(0);
            }
            match write_marked(state, t, &key, obj, current.mod_revision).await? {
                Some(answer) => return Ok(answer),
                None => continue,
            }
        }
        if t.resource.plural == "namespaces" {
            // A namespace goes in two steps, as in Kubernetes: Terminating at once (no new
            // content), gone once everything in it is deleted.
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339());
            }
            obj["status"]["phase"] = Value::String("Terminating".into());
            match state
                .store
                .put_if(&key, stored_form(&obj), current.mod_revision)
                .await?
            {
                Written::Done { revision } => {
                    tokio::spawn(finalize_namespace(state.clone(), name.to_string()));
                    return Ok(json_response(StatusCode::OK, &with_revision(obj, revision)));
                }
                Written::Conflict(_) => continue,
            }
        }
        match state.store.delete_if(&key, current.mod_revision).await? {
            Written::Done { .. } => {
                if t.resource.plural == "services" {
                    let owner = format!("{}/{name}", t.namespace.as_deref().unwrap_or(""));
                    crate::services::release(&state.store, &obj, &owner).await;
                }
                if t.resource.plural == "customresourcedefinitions" {
                    delete_custom_objects(state, &obj);
                }
                after_write(state, t).await;
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": name,
                            "group": t.resource.group,
                            "kind": t.resource.plural,
                            "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                        },
                    }),
                ));
            }
            Written::Conflict(_) => continue,
        }
    }
    Err(ApiError::conflict(
        t.resource.plural,
        t.resource.group,
        name,
    ))
}

/// Writes back an object marked for deletion (with a deletionTimestamp) and answers with
/// it; None if it changed meanwhile (the caller reads it again).
async fn write_marked(
    state: &State,
    t: &Target,
    key: &str,
    obj: Value,
    expected: i64,
) -> Result<Option<Response<Body>>, ApiError> {
    let sealed = state
        .codec
        .seal(t.resource.plural, key, stored_form(&obj))?;
    Ok(match state.store.put_if(key, sealed, expected).await? {
        Written::Done { revision } => {
            Some(json_response(StatusCode::OK, &with_revision(obj, revision)))
        }
        Written::Conflict(_) => None,
    })
}

/// Whether the node a pod is bound to exists.
async fn node_exists(state: &State, pod: &Value) -> Result<bool, ApiError> {
    let node = pod.pointer("/spec/nodeName").and_then(Value::as_str);
    let (Some(node), Some(nodes)) = (node, resources::find("", "v1", "nodes")) else {
        return Ok(false);
    };
    Ok(state.store.get(&nodes.key(None, node)).await?.0.is_some())
}

/// The most seconds a pod may be given to stop (a century; a larger request is cut to it).
const MAX_GRACE_SECONDS: i64 = 100 * 365 * 24 * 3600;

/// The seconds a deleted pod is given to stop, by Kubernetes' rules: the request's, else
/// the pod's `terminationGracePeriodSeconds` (30 by default); negative is 1; none for a pod
/// on no node or one that has finished (nothing runs it).
fn pod_grace_period(pod: &Value, requested: Option<i64>) -> i64 {
    let own = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    let grace = requested.unwrap_or(own);
    let unscheduled = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    let finished = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    match grace {
        _ if unscheduled || finished => 0,
        g if g < 0 => 1,
        g => g.min(MAX_GRACE_SECONDS),
    }
}

/// Creates the `kubernetes` Service in `default` if it does not exist.
pub async fn ensure_kubernetes_service(state: &State, secure_port: u16) -> Result<(), ApiError> {
    let Some(r) = resources::find("", "v1", "services") else {
        return Ok(());
    };
    let mut obj = crate::services::kubernetes_service(&state.service_range, secure_port);
    obj["metadata"]["uid"] = Value::String(new_uid());
    obj["metadata"]["creationTimestamp"] = Value::String(now_rfc3339());
    let ip_key = crate::services::first_ip_key(&state.service_range);
    state
        .store
        .put_if(&ip_key, b"default/kubernetes".to_vec(), 0)
        .await?;
    state
        .store
        .put_if(&r.key(Some("default"), "kubernetes"), stored_form(&obj), 0)
        .await
        .map(|_| ())
}

/// Creates the namespace if it does not exist (the system namespaces every cluster has).
pub async fn ensure_namespace(store: &Store, name: &str) -> Result<(), ApiError> {
    let Some(r) = resources::find("", "v1", "namespaces") else {
        return Ok(());
    };
    let obj = json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": new_uid(), "creationTimestamp": now_rfc3339()},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    });
    store
        .put_if(&r.key(None, name), stored_form(&obj), 0)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| labels_match(&parse_label_selector(s).unwrap(), &obj);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, db)"));
        assert!(!m("tier notin (front)"));
        assert!(m("!missing"));
        assert!(m(""));
    }

    #[test]
    fn raw_items_get_their_revision_and_nothing_else_changes() {
        let stored = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"labels":{"a":"b"},"name":"p"},"spec":{"x":[1,{"y":"\"z"}]}}"#;
        let raw = raw_with_revision(stored, 42).expect("an object");
        let got: Value = serde_json::from_slice(&raw).expect("JSON");
        let mut want: Value = serde_json::from_slice(stored).expect("JSON");
        want["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(got, want);
        assert!(raw_with_revision(b"[1]", 1).is_none());
        assert!(raw_with_revision(br#"{"kind":"X"}"#, 1).is_none());
    }

    #[test]
    fn pods_get_a_grace_period_only_when_something_runs_them() {
        let pod = |node: &str, phase: &str, own: Option<i64>| {
            json!({"spec": {"nodeName": node, "terminationGracePeriodSeconds": own},
                   "status": {"phase": phase}})
        };
        assert_eq!(pod_grace_period(&pod("n1", "Running", None), None), 30);
        assert_eq!(pod_grace_period(&pod("n1", "Running", Some(5)), None), 5);
        assert_eq!(pod_grace_period(&pod("n1", "Running", Some(5)), Some(2)), 2);
        assert_eq!(pod_grace_period(&pod("n1", "Running", None), Some(0)), 0);
        assert_eq!(pod_grace_period(&pod("n1", "Running", None), Some(-3)), 1);
        assert_eq!(pod_grace_period(&pod("", "Pending", None), None), 0);
        assert_eq!(pod_grace_period(&pod("n1", "Succeeded", None), None), 0);
        assert_eq!(
            pod_grace_period(&pod("n1", "Running", None), Some(i64::MAX)),
            MAX_GRACE_SECONDS
        );
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue(42, b"/registry/configmaps/default/x\0");
        assert_eq!(
            decode_continue(&token).unwrap(),
            (42, b"/registry/configmaps/default/x\0".to_vec())
        );
        assert!(decode_continue("garbage!").is_err());
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier&limit=2");
        assert_eq!(q["labelSelector"], "app=web,tier");
        assert_eq!(q["limit"], "2");
    }
}
