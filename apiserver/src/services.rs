//! Services: defaults, validation, and the cluster IPs and node ports they hold.
//!
//! An address or port is allocated by creating `/registry/ranges/serviceips/<ip>` or
//! `/registry/ranges/servicenodeports/<port>` with a Txn that requires the key to be absent,
//! so two apiservers can never hand out the same one. Deleting the Service frees them.

use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{json, Value};

use crate::etcd::{Store, Written};
use crate::status::ApiError;

const IP_PREFIX: &str = "/registry/ranges/serviceips/";
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";
/// kube-apiserver's --service-node-port-range.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
const ATTEMPTS: usize = 64;

/// `--service-cluster-ip-range` (IPv4).
#[derive(Debug, Clone, Copy)]
pub struct IpRange {
    base: u32,
    size: u32,
}

impl IpRange {
    pub fn parse(cidr: &str) -> Result<IpRange, String> {
        let (ip, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not a CIDR like 10.96.0.0/12"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{cidr:?}: not an IPv4 address"))?;
        let bits: u32 = bits
            .parse()
            .ok()
            .filter(|b| (8..=30).contains(b))
            .ok_or_else(|| format!("{cidr:?}: the prefix must be /8 to /30"))?;
        let size = 1u32 << (32 - bits);
        Ok(IpRange {
            base: u32::from(ip) & !(size - 1),
            size,
        })
    }

    /// The range's first usable address: the `kubernetes` Service's.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size - 1
    }

    fn random(&self) -> Ipv4Addr {
        // The network and broadcast addresses, and the first (kept for `kubernetes`), are
        // never handed out at random.
        Ipv4Addr::from(self.base + rand::thread_rng().gen_range(2..self.size - 1))
    }
}

fn invalid(name: &str, field: &str, msg: String) -> ApiError {
    ApiError::invalid("Service", "", name, vec![(field.to_string(), msg)])
}

async fn claim(store: &Store, key: String, owner: &str) -> Result<bool, ApiError> {
    Ok(matches!(
        store.put_if(&key, owner.as_bytes().to_vec(), 0).await?,
        Written::Done { .. }
    ))
}

/// Frees `key` if `owner` still holds it.
async fn free(store: &Store, key: &str, owner: &str) {
    if let Ok((Some(kv), _)) = store.get(key).await {
        if kv.value == owner.as_bytes() {
            let _ = store.delete_if(key, kv.mod_revision).await;
        }
    }
}

/// The keys a Service holds: its cluster IP and node ports.
fn held(obj: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = obj.pointer("/spec/clusterIP").and_then(Value::as_str) {
        if ip.parse::<Ipv4Addr>().is_ok() {
            keys.push(format!("{IP_PREFIX}{ip}"));
        }
    }
    for p in obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = p.get("nodePort").and_then(Value::as_u64) {
            keys.push(format!("{PORT_PREFIX}{n}"));
        }
    }
    keys
}

/// Frees what a deleted Service (`owner`: namespace/name) held.
pub async fn release(store: &Store, obj: &Value, owner: &str) {
    for key in held(obj) {
        free(store, &key, owner).await;
    }
}

/// Fills in Kubernetes' defaults and checks the spec; `old` is the stored Service on an
/// update (its cluster IP cannot change, and it keeps its node ports).
fn defaults(obj: &mut Value, name: &str, old: Option<&Value>) -> Result<(), ApiError> {
    if !obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"] = json!({});
    }
    let spec = &mut obj["spec"];
    let kind = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&kind.as_str()) {
        return Err(invalid(
            name,
            "spec.type",
            format!("Unsupported value: \"{kind}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        ));
    }
    spec["type"] = json!(kind);
    for (field, value) in [
        ("sessionAffinity", json!("None")),
        ("internalTrafficPolicy", json!("Cluster")),
        ("ipFamilyPolicy", json!("SingleStack")),
        ("ipFamilies", json!(["IPv4"])),
    ] {
        if spec.get(field).is_none() && kind != "ExternalName" {
            spec[field] = value;
        }
    }
    if (kind == "NodePort" || kind == "LoadBalancer") && spec.get("externalTrafficPolicy").is_none()
    {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    if let Some(old) = old {
        let was = old
            .pointer("/spec/clusterIP")
            .cloned()
            .unwrap_or(Value::Null);
        match spec.get("clusterIP") {
            None => spec["clusterIP"] = was.clone(),
            Some(v) if v.as_str() == Some("") => spec["clusterIP"] = was.clone(),
            Some(v) if *v != was => {
                return Err(invalid(
                    name,
                    "spec.clusterIP",
                    format!("Invalid value: {v}: field is immutable"),
                ))
            }
            _ => {}
        }
        if let Some(ips) = old.pointer("/spec/clusterIPs") {
            spec["clusterIPs"] = ips.clone();
        }
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ports = spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    if ports.is_empty() && !headless && kind != "ExternalName" {
        return Err(invalid(name, "spec.ports", "Required value".into()));
    }
    let mut out = Vec::new();
    for (i, mut p) in ports.into_iter().enumerate() {
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            return Err(invalid(
                name,
                &format!("spec.ports[{i}].port"),
                format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
            ));
        }
        if p.get("protocol").is_none() {
            p["protocol"] = json!("TCP");
        }
        if p.get("targetPort").is_none() {
            p["targetPort"] = json!(port);
        }
        if kind == "NodePort" || kind == "LoadBalancer" {
            if p.get("nodePort").is_none() {
                // An update keeps the node port the same port had.
                if let Some(n) = old_ports
                    .iter()
                    .find(|o| {
                        o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol")
                    })
                    .and_then(|o| o.get("nodePort"))
                {
                    p["nodePort"] = n.clone();
                }
            }
        } else if let Some(m) = p.as_object_mut() {
            m.remove("nodePort");
        }
        out.push(p);
    }
    if !out.is_empty() || spec.get("ports").is_some() {
        spec["ports"] = Value::Array(out);
    }
    Ok(())
}

/// Defaults, checks and allocations for a new Service. Returns the keys it claimed, which
/// the caller frees if the Service is not created after all.
pub async fn on_create(
    store: &Store,
    range: &IpRange,
    obj: &mut Value,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>, ApiError> {
    defaults(obj, name, None)?;
    let owner = format!("{namespace}/{name}");
    let mut claimed = Vec::new();
    let result = allocate(store, range, obj, name, &owner, &[], &mut claimed).await;
    if result.is_err() {
        free_all(store, &claimed, &owner).await;
    }
    result.map(|()| claimed)
}

/// Defaults, checks and allocations for a changed Service; returns (claimed, to free once
/// the update is written).
pub async fn on_update(
    store: &Store,
    range: &IpRange,
    old: &Value,
    obj: &mut Value,
    namespace: &str,
    name: &str,
) -> Result<(Vec<String>, Vec<String>), ApiError> {
    defaults(obj, name, Some(old))?;
    let owner = format!("{namespace}/{name}");
    let had = held(old);
    let mut claimed = Vec::new();
    if let Err(e) = allocate(store, range, obj, name, &owner, &had, &mut claimed).await {
        free_all(store, &claimed, &owner).await;
        return Err(e);
    }
    let keep = held(obj);
    let dropped = had.into_iter().filter(|k| !keep.contains(k)).collect();
    Ok((claimed, dropped))
}

async fn allocate(
    store: &Store,
    range: &IpRange,
    obj: &mut Value,
    name: &str,
    owner: &str,
    already: &[String],
    claimed: &mut Vec<String>,
) -> Result<(), ApiError> {
    let spec = &mut obj["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if kind != "ExternalName" {
        match spec.get("clusterIP").and_then(Value::as_str).unwrap_or("") {
            "None" => {}
            "" => {
                let mut got = None;
                for _ in 0..ATTEMPTS {
                    let ip = range.random();
                    let key = format!("{IP_PREFIX}{ip}");
                    if claim(store, key.clone(), owner).await? {
                        claimed.push(key);
                        got = Some(ip);
                        break;
                    }
                }
                let ip = got.ok_or_else(|| {
                    ApiError::internal("failed to allocate a serviceIP: range is full")
                })?;
                spec["clusterIP"] = json!(ip.to_string());
                spec["clusterIPs"] = json!([ip.to_string()]);
            }
            wanted => {
                let ip: Ipv4Addr = wanted.parse().map_err(|_| {
                    invalid(name, "spec.clusterIP", format!("Invalid value: \"{wanted}\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"))
                })?;
                let key = format!("{IP_PREFIX}{ip}");
                if !already.contains(&key) {
                    // The first address is the kubernetes Service's, whether or not it exists.
                    if !range.contains(ip) || ip == range.first() {
                        return Err(invalid(name, "spec.clusterIP", format!("Invalid value: \"{wanted}\": provided IP is not in the valid range")));
                    }
                    if !claim(store, key.clone(), owner).await? {
                        return Err(invalid(
                            name,
                            "spec.clusterIP",
                            format!(
                                "Invalid value: \"{wanted}\": provided IP is already allocated"
                            ),
                        ));
                    }
                    claimed.push(key);
                }
                spec["clusterIPs"] = json!([wanted]);
            }
        }
    }
    if kind == "NodePort" || kind == "LoadBalancer" {
        let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) else {
            return Ok(());
        };
        for (i, p) in ports.iter_mut().enumerate() {
            match p.get("nodePort").and_then(Value::as_u64) {
                Some(n) => {
                    let key = format!("{PORT_PREFIX}{n}");
                    if already.contains(&key) || claimed.contains(&key) {
                        continue;
                    }
                    if n > u64::from(u16::MAX) || !NODE_PORTS.contains(&(n as u16)) {
                        return Err(invalid(name, &format!("spec.ports[{i}].nodePort"), format!("Invalid value: {n}: provided port is not in the valid range. The range of valid ports is 30000-32767")));
                    }
                    if !claim(store, key.clone(), owner).await? {
                        return Err(invalid(
                            name,
                            &format!("spec.ports[{i}].nodePort"),
                            format!("Invalid value: {n}: provided port is already allocated"),
                        ));
                    }
                    claimed.push(key);
                }
                None => {
                    let mut got = None;
                    for _ in 0..ATTEMPTS {
                        let n = rand::thread_rng().gen_range(NODE_PORTS);
                        let key = format!("{PORT_PREFIX}{n}");
                        if claim(store, key.clone(), owner).await? {
                            claimed.push(key);
                            got = Some(n);
                            break;
                        }
                    }
                    let n = got.ok_or_else(|| {
                        ApiError::internal("failed to allocate a nodePort: range is full")
                    })?;
                    p["nodePort"] = json!(n);
                }
            }
        }
    }
    Ok(())
}

/// Frees keys `owner` holds (claimed for a write that did not happen, or dropped by one
/// that did).
pub async fn free_all(store: &Store, keys: &[String], owner: &str) {
    for key in keys {
        free(store, key, owner).await;
    }
}

/// The `kubernetes` Service every cluster has, pointing at the apiservers.
pub fn kubernetes_service(range: &IpRange, secure_port: u16) -> Value {
    let ip = range.first().to_string();
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": secure_port}],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
        },
        "status": {"loadBalancer": {}},
    })
}

/// The key the `kubernetes` Service's address is held under.
pub fn first_ip_key(range: &IpRange) -> String {
    format!("{IP_PREFIX}{}", range.first())
}

/// `80/TCP`, `80:30080/TCP`, comma-separated: the PORT(S) column.
pub fn ports_cell(obj: &Value) -> String {
    let ports: Vec<String> = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(n) => format!("{port}:{n}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_keep_their_first_address() {
        let r = IpRange::parse("10.96.0.0/12").unwrap();
        assert_eq!(r.first(), Ipv4Addr::new(10, 96, 0, 1));
        for _ in 0..100 {
            let ip = r.random();
            assert!(r.contains(ip) && ip != r.first(), "{ip}");
        }
        assert!(IpRange::parse("10.96.0.0").is_err());
        assert!(IpRange::parse("10.96.0.0/31").is_err());
    }

    #[test]
    fn defaults_and_immutability_follow_kubernetes() {
        let mut svc = json!({"spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        defaults(&mut svc, "web", None).unwrap();
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        let old = json!({"spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}});
        let mut changed = json!({"spec": {"clusterIP": "10.96.0.8", "ports": [{"port": 80}]}});
        let e = defaults(&mut changed, "web", Some(&old)).unwrap_err();
        assert!(e.message.contains("field is immutable"), "{}", e.message);
        let mut none = json!({"spec": {}});
        assert!(defaults(&mut none, "web", None).is_err());
        assert_eq!(
            ports_cell(
                &json!({"spec": {"ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}})
            ),
            "80:30080/TCP"
        );
    }
}
