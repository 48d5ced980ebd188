//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), which kubectl's typed
//! generators send (`kubectl create configmap|secret|namespace|serviceaccount|deployment`).
//!
//! A body is the magic `k8s\0` and a `runtime.Unknown` { typeMeta { apiVersion, kind },
//! raw }, where `raw` is the object in Kubernetes' protobuf schema. Each kind's message is
//! described here by its field numbers (from Kubernetes' published `generated.proto`), and
//! decoded straight to the JSON the rest of the server works with.

use base64::Engine;
use serde_json::{json, Map, Value};

pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8; 4] = b"k8s\0";

/// How one field decodes.
enum Kind {
    Str,
    Int,
    /// A plain (not pointer) Go integer whose JSON omits zero.
    IntOmitZero,
    Bool,
    Time,
    Msg(&'static [Field]),
    RepeatedStr,
    RepeatedMsg(&'static [Field]),
    MapStr,
    MapBytes,
    /// `map<string, Quantity>` (a Quantity is a message holding its string form as field 1).
    MapQuantity,
    /// IntOrString: type (1: 0 int, 1 string), intVal (2), strVal (3).
    IntOrStr,
}

type Field = (u64, &'static str, Kind);

use Kind::*;

static OWNER_REFERENCE: &[Field] = &[
    (5, "apiVersion", Str),
    (1, "kind", Str),
    (3, "name", Str),
    (4, "uid", Str),
    (6, "controller", Bool),
    (7, "blockOwnerDeletion", Bool),
];
static OBJECT_META: &[Field] = &[
    (1, "name", Str),
    (2, "generateName", Str),
    (3, "namespace", Str),
    (4, "selfLink", Str),
    (5, "uid", Str),
    (6, "resourceVersion", Str),
    (7, "generation", Int),
    (8, "creationTimestamp", Time),
    (9, "deletionTimestamp", Time),
    (10, "deletionGracePeriodSeconds", Int),
    (11, "labels", MapStr),
    (12, "annotations", MapStr),
    (13, "ownerReferences", RepeatedMsg(OWNER_REFERENCE)),
    (14, "finalizers", RepeatedStr),
];
static CONFIG_MAP: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "data", MapStr),
    (3, "binaryData", MapBytes),
    (4, "immutable", Bool),
];
static SECRET: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "data", MapBytes),
    (3, "type", Str),
    (4, "stringData", MapStr),
    (5, "immutable", Bool),
];
static NAMESPACE_SPEC: &[Field] = &[(1, "finalizers", RepeatedStr)];
static NAMESPACE_STATUS: &[Field] = &[(1, "phase", Str)];
static NAMESPACE: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "spec", Msg(NAMESPACE_SPEC)),
    (3, "status", Msg(NAMESPACE_STATUS)),
];
static OBJECT_REFERENCE: &[Field] = &[
    (1, "kind", Str),
    (2, "namespace", Str),
    (3, "name", Str),
    (4, "uid", Str),
    (5, "apiVersion", Str),
    (6, "resourceVersion", Str),
    (7, "fieldPath", Str),
];
static LOCAL_OBJECT_REFERENCE: &[Field] = &[(1, "name", Str)];
static SERVICE_ACCOUNT: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "secrets", RepeatedMsg(OBJECT_REFERENCE)),
    (3, "imagePullSecrets", RepeatedMsg(LOCAL_OBJECT_REFERENCE)),
    (4, "automountServiceAccountToken", Bool),
];

static LABEL_SELECTOR_REQUIREMENT: &[Field] = &[
    (1, "key", Str),
    (2, "operator", Str),
    (3, "values", RepeatedStr),
];
static LABEL_SELECTOR: &[Field] = &[
    (1, "matchLabels", MapStr),
    (
        2,
        "matchExpressions",
        RepeatedMsg(LABEL_SELECTOR_REQUIREMENT),
    ),
];
static CONTAINER_PORT: &[Field] = &[
    (1, "name", Str),
    (2, "hostPort", IntOmitZero),
    (3, "containerPort", Int),
    (4, "protocol", Str),
    (5, "hostIP", Str),
];
static ENV_VAR: &[Field] = &[(1, "name", Str), (2, "value", Str)];
static RESOURCE_REQUIREMENTS: &[Field] =
    &[(1, "limits", MapQuantity), (2, "requests", MapQuantity)];
static CONTAINER: &[Field] = &[
    (1, "name", Str),
    (2, "image", Str),
    (3, "command", RepeatedStr),
    (4, "args", RepeatedStr),
    (5, "workingDir", Str),
    (6, "ports", RepeatedMsg(CONTAINER_PORT)),
    (7, "env", RepeatedMsg(ENV_VAR)),
    (8, "resources", Msg(RESOURCE_REQUIREMENTS)),
    (13, "terminationMessagePath", Str),
    (14, "imagePullPolicy", Str),
    (20, "terminationMessagePolicy", Str),
];
static EMPTY: &[Field] = &[];
static POD_SPEC: &[Field] = &[
    (2, "containers", RepeatedMsg(CONTAINER)),
    (3, "restartPolicy", Str),
    (4, "terminationGracePeriodSeconds", Int),
    (5, "activeDeadlineSeconds", Int),
    (6, "dnsPolicy", Str),
    (7, "nodeSelector", MapStr),
    (8, "serviceAccountName", Str),
    (9, "serviceAccount", Str),
    (10, "nodeName", Str),
    (11, "hostNetwork", Bool),
    (14, "securityContext", Msg(EMPTY)),
    (19, "schedulerName", Str),
    (20, "initContainers", RepeatedMsg(CONTAINER)),
];
static POD_TEMPLATE_SPEC: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "spec", Msg(POD_SPEC)),
];
static ROLLING_UPDATE_DEPLOYMENT: &[Field] =
    &[(1, "maxUnavailable", IntOrStr), (2, "maxSurge", IntOrStr)];
static DEPLOYMENT_STRATEGY: &[Field] = &[
    (1, "type", Str),
    (2, "rollingUpdate", Msg(ROLLING_UPDATE_DEPLOYMENT)),
];
static DEPLOYMENT_SPEC: &[Field] = &[
    (1, "replicas", Int),
    (2, "selector", Msg(LABEL_SELECTOR)),
    (3, "template", Msg(POD_TEMPLATE_SPEC)),
    (4, "strategy", Msg(DEPLOYMENT_STRATEGY)),
    (5, "minReadySeconds", Int),
    (6, "revisionHistoryLimit", Int),
    (7, "paused", Bool),
    (9, "progressDeadlineSeconds", Int),
];
static DEPLOYMENT: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "spec", Msg(DEPLOYMENT_SPEC)),
    (3, "status", Msg(EMPTY)),
];

static POD: &[Field] = &[
    (1, "metadata", Msg(OBJECT_META)),
    (2, "spec", Msg(POD_SPEC)),
    (3, "status", Msg(EMPTY)),
];

fn message_of(kind: &str) -> Option<&'static [Field]> {
    match kind {
        "Pod" => Some(POD),
        "Deployment" => Some(DEPLOYMENT),
        "ConfigMap" => Some(CONFIG_MAP),
        "Secret" => Some(SECRET),
        "Namespace" => Some(NAMESPACE),
        "ServiceAccount" => Some(SERVICE_ACCOUNT),
        _ => None,
    }
}

/// One field as read off the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                Wire::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        Ok(Some((number, value)))
    }
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a string field is not UTF-8".to_string())
}

/// A map entry: key (1) and value (2).
fn entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: b };
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while let Some((n, w)) = r.next()? {
        match (n, w) {
            (1, Wire::Bytes(k)) => key = utf8(k)?,
            (2, Wire::Bytes(v)) if bytes_value => {
                value = Value::String(base64::engine::general_purpose::STANDARD.encode(v))
            }
            (2, Wire::Bytes(v)) => value = Value::String(utf8(v)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn time(b: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: b };
    let mut seconds = 0i64;
    while let Some((n, w)) = r.next()? {
        if let (1, Wire::Varint(v)) = (n, w) {
            seconds = v as i64;
        }
    }
    let t = chrono::DateTime::from_timestamp(seconds, 0).ok_or("a time out of range")?;
    Ok(Value::String(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn decode_message(b: &[u8], fields: &[Field]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut r = Reader { buf: b };
    while let Some((n, w)) = r.next()? {
        // Fields this server does not know are dropped, as unknown JSON fields are.
        let Some((_, name, kind)) = fields.iter().find(|(num, _, _)| *num == n) else {
            continue;
        };
        let name = name.to_string();
        match (kind, w) {
            // Go writes a plain string field even when empty; its JSON leaves it out.
            (Str, Wire::Bytes(v)) if v.is_empty() => {}
            (Str, Wire::Bytes(v)) => {
                out.insert(name, Value::String(utf8(v)?));
            }
            (IntOmitZero, Wire::Varint(0)) => {}
            (Int | IntOmitZero, Wire::Varint(v)) => {
                out.insert(name, json!(v as i64));
            }
            (Bool, Wire::Varint(v)) => {
                out.insert(name, Value::Bool(v != 0));
            }
            (Time, Wire::Bytes(v)) => {
                out.insert(name, time(v)?);
            }
            (Msg(inner), Wire::Bytes(v)) => {
                out.insert(name, decode_message(v, inner)?);
            }
            (RepeatedStr, Wire::Bytes(v)) => {
                let list = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = list {
                    a.push(Value::String(utf8(v)?));
                }
            }
            (RepeatedMsg(inner), Wire::Bytes(v)) => {
                let item = decode_message(v, inner)?;
                let list = out.entry(name).or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(a) = list {
                    a.push(item);
                }
            }
            (MapQuantity, Wire::Bytes(v)) => {
                let (k, quantity) = entry(v, true)?;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(quantity.as_str().unwrap_or(""))
                    .map_err(|e| e.to_string())?;
                let value = match decode_message(&raw, &[(1, "string", Str)])?.get("string") {
                    Some(s) => s.clone(),
                    None => Value::String("0".into()),
                };
                let map = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = map {
                    m.insert(k, value);
                }
            }
            (IntOrStr, Wire::Bytes(v)) => {
                let fields = [(1, "type", Int), (2, "intVal", Int), (3, "strVal", Str)];
                let ios = decode_message(v, &fields)?;
                let value = if ios.get("type").and_then(Value::as_i64) == Some(1) {
                    ios.get("strVal").cloned().unwrap_or(json!(""))
                } else {
                    ios.get("intVal").cloned().unwrap_or(json!(0))
                };
                out.insert(name, value);
            }
            (MapStr | MapBytes, Wire::Bytes(v)) => {
                let (k, val) = entry(v, matches!(kind, MapBytes))?;
                let map = out.entry(name).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = map {
                    m.insert(k, val);
                }
            }
            _ => return Err(format!("field {name} has the wrong wire type")),
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body into the object's JSON form.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or("the body does not start with the protobuf magic k8s\\0")?;
    let mut r = Reader { buf: rest };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    while let Some((n, w)) = r.next()? {
        match (n, w) {
            (1, Wire::Bytes(type_meta)) => {
                let mut t = Reader { buf: type_meta };
                while let Some((n, w)) = t.next()? {
                    match (n, w) {
                        (1, Wire::Bytes(v)) => api_version = utf8(v)?,
                        (2, Wire::Bytes(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(v)) => raw = Some(v),
            (3, Wire::Bytes(enc)) if !enc.is_empty() => {
                return Err("compressed protobuf bodies are not supported".into())
            }
            _ => {}
        }
    }
    let fields = message_of(&kind).ok_or_else(|| {
        format!("protobuf bodies of kind {kind:?} are not supported yet; send JSON")
    })?;
    let mut obj = decode_message(raw.unwrap_or_default(), fields)?;
    obj["apiVersion"] = Value::String(api_version);
    obj["kind"] = Value::String(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        out.push(((number << 3) | 2) as u8);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }

    #[test]
    fn a_config_map_decodes_from_the_envelope() {
        let mut meta = Vec::new();
        field(&mut meta, 1, b"settings");
        let mut label = Vec::new();
        field(&mut label, 1, b"app");
        field(&mut label, 2, b"web");
        field(&mut meta, 11, &label);
        let mut cm = Vec::new();
        field(&mut cm, 1, &meta);
        let mut data = Vec::new();
        field(&mut data, 1, b"a");
        field(&mut data, 2, b"b");
        field(&mut cm, 2, &data);
        cm.extend_from_slice(&[4 << 3, 1]); // immutable: true
        let mut type_meta = Vec::new();
        field(&mut type_meta, 1, b"v1");
        field(&mut type_meta, 2, b"ConfigMap");
        let mut body = b"k8s\0".to_vec();
        field(&mut body, 1, &type_meta);
        field(&mut body, 2, &cm);
        let obj = decode(&body).unwrap();
        assert_eq!(
            obj,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "settings", "labels": {"app": "web"}},
                "data": {"a": "b"},
                "immutable": true,
            })
        );
        assert!(decode(b"not protobuf").is_err());
        assert!(decode(&body[..body.len() - 3]).is_err());
    }
}
