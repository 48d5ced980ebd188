//! The apiserver driven by real kubectl (1.32) with the kubeconfig Flotilla writes:
//! `flotilla up`; several apiservers on one 3-member store; and the apiserver on Debian's
//! etcd 3.4 instead of our store.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs kubectl with `kubeconfig`, its cache under `home`.
fn kubectl_in(home: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new("/usr/bin/kubectl");
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("KUBECONFIG", kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().expect("running kubectl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("kubectl stdin");
        pipe.write_all(input.as_bytes())
            .expect("writing kubectl stdin");
    }
    child.wait_with_output().expect("kubectl output")
}

/// One kubectl user: a kubeconfig and a home for its caches.
struct Kubectl {
    home: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: PathBuf) -> Kubectl {
        Kubectl {
            home: tempfile::tempdir().expect("kubectl home"),
            kubeconfig,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        kubectl_in(self.home.path(), &self.kubeconfig, args, None)
    }

    /// Runs kubectl with an extra environment variable (e.g. KUBE_EDITOR).
    fn with_env(&self, var: &str, value: &str, args: &[&str]) -> Output {
        Command::new("/usr/bin/kubectl")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.home.path())
            .env("KUBECONFIG", &self.kubeconfig)
            .env(var, value)
            .arg("--request-timeout=20s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running kubectl")
    }

    fn stdin(&self, args: &[&str], input: &str) -> Output {
        kubectl_in(self.home.path(), &self.kubeconfig, args, Some(input))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", describe(&out));
        stdout(&out)
    }

    fn fails_with(&self, args: &[&str], needle: &str) {
        let out = self.run(args);
        assert!(
            !out.status.success() && stderr(&out).contains(needle),
            "kubectl {args:?}: expected failure with {needle:?}, got {}",
            describe(&out)
        );
    }

    fn wait_ready(&self) {
        let ok = poll(READY_TIMEOUT, || {
            let out = self.run(&["get", "--raw", "/readyz"]);
            (out.status.success() && self.run(&["get", "ns", "default"]).status.success())
                .then_some(())
        });
        assert!(ok.is_some(), "the apiserver did not become ready");
    }
}

fn spawn(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    Proc(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting flotilla"),
    )
}

const MANIFEST: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  labels:
    app: web
data:
  color: blue
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  labels:
    app: web
stringData:
  password: hunter2
---
apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    app: web
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: busybox:1.36
        ports:
        - containerPort: 8080
";

/// The part of the kubectl session every apiserver setup must pass.
fn session(k: &Kubectl) {
    let version = k.ok(&["version"]);
    assert!(version.contains("Server Version: v1.32"), "{version}");
    let resources = k.ok(&["api-resources"]);
    for r in ["configmaps", "namespaces", "secrets"] {
        assert!(resources.contains(r), "{resources}");
    }
    assert_eq!(k.ok(&["get", "--raw", "/readyz"]), "ok");
    let ns = k.ok(&["get", "namespaces"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(ns.contains(n), "{ns}");
    }

    // A multi-document manifest into a new namespace, with kubectl's default validation
    // (which the server does: kubectl finds fieldValidation in its OpenAPI v3 documents).
    let spaced = k.stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n",
    );
    assert!(spaced.status.success(), "{}", describe(&spaced));
    let applied = k.stdin(
        &["apply", "-n", "shop", "-f", "-"],
        &MANIFEST.replace("blue", "grey"),
    );
    assert_eq!(
        stdout_ok(&applied, &["apply"]),
        "configmap/web-config created\nsecret/web-secret created\nservice/web created\n\
         deployment.apps/web created\n"
    );
    // Applied again after an edit: a three-way merge changes what changed. (A Secret
    // given as stringData is "configured" every time, as with Kubernetes: the server keeps
    // it as data.)
    let applied = k.stdin(&["apply", "-n", "shop", "-f", "-"], MANIFEST);
    assert_eq!(
        stdout_ok(&applied, &["apply"]),
        "configmap/web-config configured\nsecret/web-secret configured\nservice/web unchanged\n\
         deployment.apps/web unchanged\n"
    );
    let again = k.stdin(&["apply", "-n", "shop", "-f", "-"], MANIFEST);
    assert!(
        stdout_ok(&again, &["apply"]).starts_with("configmap/web-config unchanged\n"),
        "{}",
        describe(&again)
    );
    // Unknown fields: refused under kubectl's default (Strict), a warning when asked for.
    let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: odd\nspec:\n  replicas: 1\n";
    let strict = k.stdin(&["create", "-n", "shop", "-f", "-"], unknown);
    assert!(
        stderr(&strict).contains(
            "Error from server (BadRequest): error when creating \"STDIN\": ConfigMap in version \"v1\" \
             cannot be handled as a ConfigMap: strict decoding error: unknown field \"spec\""
        ),
        "{}",
        describe(&strict)
    );
    let warned = k.stdin(
        &["create", "-n", "shop", "-f", "-", "--validate=warn"],
        unknown,
    );
    assert!(
        warned.status.success() && stderr(&warned).contains("Warning: unknown field \"spec\""),
        "{}",
        describe(&warned)
    );
    k.ok(&["delete", "cm", "odd", "-n", "shop"]);
    // Services get a cluster IP from the range and node ports; the kubernetes Service is
    // there, so cluster-info finds the control plane.
    let svc = k.ok(&[
        "get",
        "svc",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}",
    ]);
    let (ip, node_port) = svc.split_once(' ').unwrap_or_else(|| panic!("{svc}"));
    assert!(
        ip.starts_with("10.") && ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "{svc}"
    );
    let node_port: u16 = node_port.parse().unwrap_or_else(|_| panic!("{svc}"));
    assert!((30000..=32767).contains(&node_port), "{svc}");
    let listed = k.ok(&["get", "svc", "-n", "shop"]);
    let header: Vec<&str> = listed
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{listed}"
    );
    assert!(listed.contains(&format!("80:{node_port}/TCP")), "{listed}");
    assert!(k
        .ok(&["get", "svc", "-n", "shop", "-o", "wide"])
        .contains("app=web"));
    let kubernetes = k.ok(&[
        "get",
        "svc",
        "kubernetes",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(kubernetes, "10.96.0.1");
    assert!(
        k.ok(&["cluster-info"])
            .contains("Kubernetes control plane is running at https://127.0.0.1:"),
        "cluster-info"
    );
    // An address already taken is refused; freed when its Service goes.
    let taken = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: twin\nspec:\n  clusterIP: {ip}\n  ports:\n  - port: 81\n"
    );
    let dup = k.stdin(&["create", "-n", "shop", "-f", "-"], &taken);
    assert!(
        stderr(&dup).contains("provided IP is already allocated"),
        "{}",
        describe(&dup)
    );
    // A strategic merge patch merges ports by their port number.
    k.ok(&[
        "patch",
        "svc",
        "web",
        "-n",
        "shop",
        "-p",
        r#"{"spec":{"ports":[{"port":80,"targetPort":9090},{"name":"admin","port":9000}]}}"#,
    ]);
    let ports = k.ok(&[
        "get",
        "svc",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={range .spec.ports[*]}{.port}:{.targetPort}:{.nodePort} {end}",
    ]);
    assert!(
        ports.starts_with(&format!("80:9090:{node_port} 9000:9000:")),
        "{ports}"
    );

    // describe (which also lists the object's events), and events.
    let described = k.ok(&["describe", "svc", "web", "-n", "shop"]);
    assert!(
        described.contains("Name:") && described.contains("web"),
        "{described}"
    );
    let event = "apiVersion: v1\nkind: Event\nmetadata:\n  name: web.1\ninvolvedObject:\n  kind: Service\n  name: web\n  namespace: shop\nreason: Tested\nmessage: hello from the test\ntype: Normal\n";
    let out = k.stdin(
        &["create", "-n", "shop", "-f", "-", "--validate=false"],
        event,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let events = k.ok(&[
        "get",
        "events",
        "-n",
        "shop",
        "--field-selector",
        "involvedObject.name=web",
    ]);
    assert!(
        events.contains("Tested") && events.contains("service/web"),
        "{events}"
    );

    // explain walks the schemas of the OpenAPI v3 documents.
    let explained = k.ok(&["explain", "configmap"]);
    assert!(
        explained.contains("KIND:")
            && explained.contains("ConfigMap")
            && explained.contains("data"),
        "{explained}"
    );
    let field = k.ok(&["explain", "configmap.metadata.labels"]);
    assert!(
        field.contains("labels") && field.contains("map[string]string"),
        "{field}"
    );

    // kubectl's generators send protobuf bodies.
    assert_eq!(
        k.ok(&["create", "namespace", "tools"]),
        "namespace/tools created\n"
    );
    assert_eq!(
        k.ok(&[
            "create",
            "configmap",
            "gen",
            "-n",
            "tools",
            "--from-literal=a=1",
            "--from-literal=b=2"
        ]),
        "configmap/gen created\n"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "cm",
            "gen",
            "-n",
            "tools",
            "-o",
            "jsonpath={.data.b}"
        ]),
        "2"
    );
    assert_eq!(
        k.ok(&[
            "create",
            "secret",
            "generic",
            "pw",
            "-n",
            "tools",
            "--from-literal=password=s3cret"
        ]),
        "secret/pw created\n"
    );
    let pw = k.ok(&[
        "get",
        "secret",
        "pw",
        "-n",
        "tools",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(b64decode(&pw), b"s3cret");
    assert_eq!(
        k.ok(&["create", "serviceaccount", "robot", "-n", "tools"]),
        "serviceaccount/robot created\n"
    );

    // Server-side tables: the columns Kubernetes prints.
    let table = k.ok(&["get", "cm", "-n", "shop"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "DATA", "AGE"], "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["web-config", "1"])),
        "{table}"
    );
    let secrets = k.ok(&["get", "secret", "-n", "shop"]);
    assert!(secrets.starts_with("NAME"), "{secrets}");
    assert!(
        secrets.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["web-secret", "Opaque", "1"])),
        "{secrets}"
    );
    let ns = k.ok(&["get", "ns", "shop"]);
    assert!(
        ns.lines()
            .any(|l| l.split_whitespace().take(2).eq(["shop", "Active"])),
        "{ns}"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "cm",
            "web-config",
            "-n",
            "shop",
            "-o",
            "jsonpath={.data.color}"
        ]),
        "blue"
    );
    let yaml = k.ok(&["get", "cm", "web-config", "-n", "shop", "-o", "yaml"]);
    for field in [
        "resourceVersion:",
        "uid:",
        "creationTimestamp:",
        "namespace: shop",
    ] {
        assert!(yaml.contains(field), "{yaml}");
    }
    // The secret's value, decoded as a user would.
    let encoded = k.ok(&[
        "get",
        "secret",
        "web-secret",
        "-n",
        "shop",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(b64decode(&encoded), b"hunter2");

    // Labels, annotations, selectors.
    k.ok(&["label", "cm", "web-config", "-n", "shop", "tier=front"]);
    k.ok(&["annotate", "cm", "web-config", "-n", "shop", "owner=ops"]);
    let labelled = k.ok(&[
        "get",
        "cm",
        "-n",
        "shop",
        "--show-labels",
        "-l",
        "tier=front",
    ]);
    assert!(labelled.contains("app=web,tier=front"), "{labelled}");
    let none = k.run(&["get", "cm", "-n", "shop", "-l", "tier=back"]);
    assert!(
        stderr(&none).contains("No resources found"),
        "{}",
        describe(&none)
    );
    let by_name = k.ok(&[
        "get",
        "secret",
        "-n",
        "shop",
        "--field-selector",
        "metadata.name=web-secret",
        "-o",
        "name",
    ]);
    assert_eq!(by_name, "secret/web-secret\n");
    k.ok(&[
        "patch",
        "cm",
        "web-config",
        "-n",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    assert_eq!(
        k.ok(&[
            "get",
            "cm",
            "web-config",
            "-n",
            "shop",
            "-o",
            "jsonpath={.data.color}"
        ]),
        "green"
    );

    // Pages of two over a dozen objects.
    for i in 0..12 {
        let name = format!("page-{i:02}");
        let doc = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  labels: {{set: pages}}\n");
        let out = k.stdin(
            &["create", "-n", "shop", "-f", "-", "--validate=false"],
            &doc,
        );
        assert!(out.status.success(), "{}", describe(&out));
    }
    let paged = k.ok(&[
        "get",
        "cm",
        "-n",
        "shop",
        "-l",
        "set=pages",
        "--chunk-size",
        "2",
        "-o",
        "name",
    ]);
    assert_eq!(paged.lines().count(), 12, "{paged}");

    // A paged list reads one revision throughout: writes between its pages do not show;
    // a new list sees them at once; an exact resourceVersion reads the past.
    let raw_list = |query: &str| -> serde_json::Value {
        let out = k.ok(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/shop/configmaps?labelSelector=set%3Dpages&{query}"),
        ]);
        serde_json::from_str(&out).expect("a list")
    };
    let names = |list: &serde_json::Value| -> Vec<String> {
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let first = raw_list("limit=5");
    assert_eq!(
        names(&first),
        ["page-00", "page-01", "page-02", "page-03", "page-04"]
    );
    let read_at = first["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    let doc =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: page-12\n  labels: {set: pages}\n";
    let out = k.stdin(&["create", "-n", "shop", "-f", "-"], doc);
    assert!(out.status.success(), "{}", describe(&out));
    k.ok(&["delete", "cm", "page-11", "-n", "shop"]);
    let rest = raw_list(&format!("continue={token}"));
    assert_eq!(rest["metadata"]["resourceVersion"], read_at.as_str());
    assert_eq!(
        names(&rest),
        ["page-05", "page-06", "page-07", "page-08", "page-09", "page-10", "page-11"],
        "the rest of the list at its first page's revision"
    );
    let now = names(&raw_list(""));
    assert!(
        now.contains(&"page-12".to_string()) && !now.contains(&"page-11".to_string()),
        "{now:?}"
    );
    let then = names(&raw_list(&format!(
        "resourceVersion={read_at}&resourceVersionMatch=Exact"
    )));
    assert!(
        then.contains(&"page-11".to_string()) && !then.contains(&"page-12".to_string()),
        "{then:?}"
    );
    assert_eq!(names(&raw_list("resourceVersion=0")).len(), 12);
    k.fails_with(
        &[
            "get",
            "--raw",
            "/api/v1/configmaps?resourceVersion=1&resourceVersionMatch=Newest",
        ],
        "resourceVersionMatch: Unsupported value: \"Newest\"",
    );

    // Errors as kubectl prints them for Kubernetes.
    k.fails_with(
        &["get", "cm", "nope", "-n", "shop"],
        "Error from server (NotFound): configmaps \"nope\" not found",
    );
    let again = k.stdin(
        &["create", "-n", "shop", "-f", "-", "--validate=false"],
        MANIFEST,
    );
    assert!(
        stderr(&again).contains("Error from server (AlreadyExists)"),
        "{}",
        describe(&again)
    );
    let bad = k.stdin(
        &["create", "-f", "-", "--validate=false"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Bad_Name\n",
    );
    // kubectl words Invalid errors its own way: "The <Kind> <name> is invalid: <causes>".
    assert!(
        stderr(&bad).contains(
            "The Namespace \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": \
             a lowercase RFC 1123 label"
        ),
        "{}",
        describe(&bad)
    );
    k.fails_with(
        &["get", "cm", "x", "-n", "nowhere-ns", "-o", "name"],
        "NotFound",
    );

    // A watch sees a change made meanwhile.
    let (watch, lines) = watch_lines(
        k,
        &[
            "get",
            "cm",
            "web-config",
            "-n",
            "shop",
            "-w",
            "-o",
            "jsonpath={.data.color}{\"\\n\"}",
        ],
    );
    let first = lines
        .recv_timeout(POLL_TIMEOUT)
        .expect("the watch's first line");
    assert_eq!(first, "green");
    k.ok(&[
        "patch",
        "cm",
        "web-config",
        "-n",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"color":"red"}}"#,
    ]);
    let next = lines
        .recv_timeout(POLL_TIMEOUT)
        .expect("the watch saw the change");
    assert_eq!(next, "red");
    drop(watch);

    // edit, with a non-interactive editor.
    let edited = k.with_env(
        "KUBE_EDITOR",
        "sed -i s/color:\\ red/color:\\ teal/",
        &["edit", "cm", "web-config", "-n", "shop"],
    );
    assert_eq!(
        stdout_ok(&edited, &["edit"]),
        "configmap/web-config edited\n"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "cm",
            "web-config",
            "-n",
            "shop",
            "-o",
            "jsonpath={.data.color}"
        ]),
        "teal"
    );

    // wait --for=delete sees the delete; delete --wait returns once it is gone.
    let waiter = {
        let (home, kubeconfig) = (k.home.path().to_path_buf(), k.kubeconfig.clone());
        std::thread::spawn(move || {
            kubectl_in(
                &home,
                &kubeconfig,
                &[
                    "wait",
                    "--for=delete",
                    "cm/web-config",
                    "-n",
                    "shop",
                    "--timeout=30s",
                ],
                None,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        k.ok(&["delete", "cm", "web-config", "-n", "shop", "--wait"]),
        "configmap \"web-config\" deleted\n"
    );
    let waited = waiter.join().expect("the waiting kubectl");
    assert!(
        stdout(&waited).contains("condition met"),
        "{}",
        describe(&waited)
    );
    k.fails_with(&["get", "cm", "web-config", "-n", "shop"], "NotFound");

    workloads(k);
    custom_resources(k);
    both_event_apis(k);

    // Deleting a namespace deletes what is in it; nothing new may be made there meanwhile.
    assert_eq!(
        k.ok(&["delete", "namespace", "shop", "--wait"]),
        "namespace \"shop\" deleted\n"
    );
    k.fails_with(&["get", "ns", "shop"], "NotFound");
    let again = k.stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n",
    );
    assert!(again.status.success(), "{}", describe(&again));
    let left = k.run(&["get", "cm,secret,svc,ev,deploy", "-n", "shop", "-o", "name"]);
    assert_eq!(stdout(&left), "", "{}", describe(&left));
}

/// Deployments: tables, defaults, scale, protobuf create, server-side apply and its
/// conflicts, explain, validation with causes.
fn workloads(k: &Kubectl) {
    let listed = k.ok(&["get", "deploy", "-n", "shop"]);
    let header: Vec<&str> = listed
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{listed}"
    );
    assert!(listed.contains("web    0/2"), "{listed}");
    let wide = k.ok(&["get", "deploy", "web", "-n", "shop", "-o", "wide"]);
    assert!(
        wide.contains("busybox:1.36") && wide.contains("app=web"),
        "{wide}"
    );
    // Kubernetes' defaults are filled in.
    let defaults = k.ok(&[
        "get", "deploy", "web", "-n", "shop", "-o",
        "jsonpath={.spec.strategy.rollingUpdate.maxSurge} {.spec.template.spec.containers[0].imagePullPolicy} {.spec.template.spec.restartPolicy} {.metadata.generation}",
    ]);
    assert_eq!(defaults, "25% IfNotPresent Always 1");
    assert_eq!(
        k.ok(&["scale", "deployment", "web", "-n", "shop", "--replicas=3"]),
        "deployment.apps/web scaled\n"
    );
    let scaled = k.ok(&[
        "get",
        "deploy",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={.spec.replicas} {.metadata.generation}",
    ]);
    assert_eq!(scaled, "3 2");
    // kubectl create deployment sends protobuf.
    assert_eq!(
        k.ok(&[
            "create",
            "deployment",
            "made",
            "-n",
            "shop",
            "--image=busybox:1.36",
            "--replicas=2",
            "--port=80"
        ]),
        "deployment.apps/made created\n"
    );
    let made = k.ok(&[
        "get", "deploy", "made", "-n", "shop", "-o",
        "jsonpath={.spec.replicas} {.spec.selector.matchLabels.app} {.spec.template.spec.containers[0].ports[0].containerPort}",
    ]);
    assert_eq!(made, "2 made 80");
    // A status write changes only the status; a spec write never the status.
    let status = k.ok(&[
        "patch",
        "deploy",
        "made",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"readyReplicas":2,"replicas":2},"spec":{"replicas":9}}"#,
    ]);
    assert!(status.contains("patched"), "{status}");
    assert_eq!(
        k.ok(&[
            "get",
            "deploy",
            "made",
            "-n",
            "shop",
            "-o",
            "jsonpath={.spec.replicas} {.status.readyReplicas}"
        ]),
        "2 2"
    );
    assert!(k
        .ok(&["get", "deploy", "made", "-n", "shop"])
        .contains("2/2"));

    // A pod: defaulted, Pending, and only some of its spec may change.
    let pod = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: solo\nspec:\n  containers:\n  - name: c\n    image: busybox:1.36\n",
    );
    assert!(pod.status.success(), "{}", describe(&pod));
    assert_eq!(
        k.ok(&[
            "get",
            "pod",
            "solo",
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.phase} {.status.qosClass} {.spec.serviceAccountName}"
        ]),
        "Pending BestEffort default"
    );
    let forbidden = k.run(&[
        "patch",
        "pod",
        "solo",
        "-n",
        "shop",
        "-p",
        r#"{"spec":{"restartPolicy":"Never"}}"#,
    ]);
    assert!(
        stderr(&forbidden).contains(
            "The Pod \"solo\" is invalid: spec: Forbidden: pod updates may not change fields"
        ),
        "{}",
        describe(&forbidden)
    );
    k.ok(&["delete", "pod", "solo", "-n", "shop"]);

    // A pod on a node is given its grace period (which a second delete may shorten, and a
    // status write during which does not end); a forced delete ends it at once. A pod on a
    // node that does not exist goes at once.
    let node = k.stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-9\n",
    );
    assert!(node.status.success(), "{}", describe(&node));
    let orphan = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: orphan\nspec:\n  nodeName: node-404\n  \
         containers:\n  - name: c\n    image: busybox:1.36\n",
    );
    assert!(orphan.status.success(), "{}", describe(&orphan));
    k.ok(&["delete", "pod", "orphan", "-n", "shop", "--timeout=20s"]);
    let pod = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bound\nspec:\n  nodeName: node-9\n  \
         terminationGracePeriodSeconds: 45\n  containers:\n  - name: c\n    image: busybox:1.36\n",
    );
    assert!(pod.status.success(), "{}", describe(&pod));
    let grace = |k: &Kubectl| {
        k.ok(&[
            "get",
            "pod",
            "bound",
            "-n",
            "shop",
            "-o",
            "jsonpath={.metadata.deletionGracePeriodSeconds}",
        ])
    };
    k.ok(&["delete", "pod", "bound", "-n", "shop", "--wait=false"]);
    assert_eq!(grace(k), "45");
    k.ok(&[
        "patch",
        "pod",
        "bound",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    assert_eq!(
        grace(k),
        "45",
        "a status write does not end the grace period"
    );
    assert!(k
        .ok(&["get", "pod", "bound", "-n", "shop"])
        .contains("Terminating"));
    k.ok(&[
        "delete",
        "pod",
        "bound",
        "-n",
        "shop",
        "--wait=false",
        "--grace-period=60",
    ]);
    assert_eq!(grace(k), "45", "a grace period is never lengthened");
    k.ok(&[
        "delete",
        "pod",
        "bound",
        "-n",
        "shop",
        "--wait=false",
        "--grace-period=5",
    ]);
    assert_eq!(grace(k), "5");
    k.ok(&[
        "delete",
        "pod",
        "bound",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]);
    k.fails_with(
        &["get", "pod", "bound", "-n", "shop"],
        "Error from server (NotFound): pods \"bound\" not found",
    );

    // Server-side apply: created, then a conflict with the manager that changed a field,
    // then taken over with --force-conflicts.
    let ssa = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  k: v\n  j: w\n";
    let applied = k.stdin(&["apply", "--server-side", "-n", "shop", "-f", "-"], ssa);
    assert_eq!(
        stdout_ok(&applied, &["apply"]),
        "configmap/ssa serverside-applied\n"
    );
    let managers = k.ok(&[
        "get",
        "cm",
        "ssa",
        "-n",
        "shop",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}:{.metadata.managedFields[*].operation}",
    ]);
    assert_eq!(managers, "kubectl:Apply");
    k.ok(&[
        "patch",
        "cm",
        "ssa",
        "-n",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"k":"other"}}"#,
    ]);
    let conflict = k.stdin(&["apply", "--server-side", "-n", "shop", "-f", "-"], ssa);
    assert!(
        stderr(&conflict).contains(
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using v1: .data.k"
        ),
        "{}",
        describe(&conflict)
    );
    // Dropping a field from the applied configuration removes it.
    let forced = k.stdin(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-n",
            "shop",
            "-f",
            "-",
        ],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  k: v\n",
    );
    assert!(forced.status.success(), "{}", describe(&forced));
    assert_eq!(
        k.ok(&["get", "cm", "ssa", "-n", "shop", "-o", "jsonpath={.data}"]),
        r#"{"k":"v"}"#
    );

    // explain reads the schemas the server checks with.
    let explained = k.ok(&["explain", "deployment.spec"]);
    assert!(
        explained.contains("replicas") && explained.contains("Number of desired pods"),
        "{explained}"
    );
    // Validation: every bad field a cause, as kubectl prints them.
    let bad = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  selector:\n    matchLabels:\n      app: one\n  template:\n    metadata:\n      labels:\n        app: two\n    spec:\n      containers:\n      - name: c\n",
    );
    let err = stderr(&bad);
    assert!(
        err.contains("The Deployment \"bad\" is invalid: ")
            && err.contains("`selector` does not match template `labels`")
            && err.contains("spec.template.spec.containers[0].image: Required value"),
        "{}",
        describe(&bad)
    );
    let typed = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\nspec:\n  replicas: many\n",
    );
    assert!(
        stderr(&typed).contains("spec.replicas: expected an integer, got a string"),
        "{}",
        describe(&typed)
    );
}

const CRD: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size:
                type: integer
              colour:
                type: string
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size:
                type: integer
              colour:
                type: string
";

/// A CRD applied, its resources created, listed in its columns, checked against its
/// schema, and gone with it.
fn custom_resources(k: &Kubectl) {
    let applied = k.stdin(&["apply", "-f", "-"], CRD);
    assert_eq!(
        stdout_ok(&applied, &["apply"]),
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.com created\n"
    );
    let established = k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=30s",
    ]);
    assert!(established.contains("condition met"), "{established}");
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n  colour: red\n";
    let created = k.stdin(&["apply", "-n", "shop", "-f", "-"], widget);
    assert_eq!(
        stdout_ok(&created, &["apply"]),
        "widget.example.com/w1 created\n"
    );
    let listed = k.ok(&["get", "wd", "-n", "shop"]);
    let header: Vec<&str> = listed
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "SIZE", "AGE"], "{listed}");
    assert!(listed.contains("w1     3"), "{listed}");
    // Every served version reads and writes the same objects, each under its own apiVersion.
    let beta =
        "apiVersion: example.com/v1beta1\nkind: Widget\nmetadata:\n  name: w3\nspec:\n  size: 5\n";
    let created = k.stdin(&["create", "-n", "shop", "-f", "-"], beta);
    assert!(created.status.success(), "{}", describe(&created));
    let version_of = |resource: &str, name: &str| {
        k.ok(&[
            "get",
            resource,
            name,
            "-n",
            "shop",
            "-o",
            "jsonpath={.apiVersion}",
        ])
    };
    assert_eq!(version_of("wd", "w3"), "example.com/v1");
    assert_eq!(
        version_of("widgets.v1beta1.example.com", "w1"),
        "example.com/v1beta1"
    );
    let raw = k.ok(&[
        "get",
        "--raw",
        "/apis/example.com/v1beta1/namespaces/shop/widgets",
    ]);
    let list: serde_json::Value = serde_json::from_str(&raw).expect("a list");
    assert_eq!(list["apiVersion"], "example.com/v1beta1", "{raw}");
    assert!(
        list["items"]
            .as_array()
            .is_some_and(|items| items.len() == 2
                && items
                    .iter()
                    .all(|i| i["apiVersion"] == "example.com/v1beta1")),
        "{raw}"
    );
    let strict = k.stdin(
        &["create", "-n", "shop", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w2\nspec:\n  size: big\n  shape: round\n",
    );
    let err = stderr(&strict);
    assert!(
        err.contains("spec.size: expected an integer, got a string"),
        "{}",
        describe(&strict)
    );
    k.ok(&["delete", "crd", "widgets.example.com"]);
    k.fails_with(
        &["get", "widgets.example.com", "-n", "shop"],
        "the server doesn't have a resource type",
    );
}

/// Events through both APIs: one object, two forms.
fn both_event_apis(k: &Kubectl) {
    let new_form = r#"
apiVersion: events.k8s.io/v1
kind: Event
metadata: {name: started.1, namespace: shop}
eventTime: "2026-01-01T00:00:00.000000Z"
reportingController: flotilla.dev/agent
reportingInstance: node-1
action: Started
reason: Started
type: Normal
note: container web started
regarding: {kind: Pod, namespace: shop, name: web-0, apiVersion: v1}
"#;
    let out = k.stdin(&["create", "-f", "-"], new_form);
    assert!(out.status.success(), "{}", describe(&out));
    // The core API reads it in its own form.
    assert_eq!(
        k.ok(&[
            "get",
            "events.v1.",
            "started.1",
            "-n",
            "shop",
            "-o",
            "jsonpath={.message}/{.involvedObject.name}/{.reportingComponent}",
        ]),
        "container web started/web-0/flotilla.dev/agent"
    );
    // A core Event reads in the events.k8s.io form, selected by its regarding object.
    let core_form = "apiVersion: v1\nkind: Event\nmetadata: {name: pulled.1, namespace: shop}\n\
        involvedObject: {kind: Pod, namespace: shop, name: web-1}\nreason: Pulled\n\
        message: image pulled\ntype: Normal\ncount: 2\n";
    let out = k.stdin(&["create", "-f", "-"], core_form);
    assert!(out.status.success(), "{}", describe(&out));
    let raw = k.ok(&[
        "get",
        "--raw",
        "/apis/events.k8s.io/v1/namespaces/shop/events?fieldSelector=regarding.name%3Dweb-1",
    ]);
    let list: serde_json::Value = serde_json::from_str(&raw).expect("a list");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{raw}");
    assert_eq!(items[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(items[0]["note"], "image pulled");
    assert_eq!(items[0]["deprecatedCount"], 2);
    assert!(items[0].get("message").is_none(), "{raw}");
    // Tables, patches and errors in the events.k8s.io form.
    let table = k.ok(&["get", "events.v1.events.k8s.io", "-n", "shop"]);
    assert!(
        table.contains("container web started") && table.contains("image pulled"),
        "{table}"
    );
    k.ok(&[
        "patch",
        "events.v1.events.k8s.io",
        "pulled.1",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"note":"image pulled again"}"#,
    ]);
    assert_eq!(
        k.ok(&[
            "get",
            "events.v1.",
            "pulled.1",
            "-n",
            "shop",
            "-o",
            "jsonpath={.message}"
        ]),
        "image pulled again"
    );
    k.fails_with(
        &["get", "events.v1.events.k8s.io", "gone.1", "-n", "shop"],
        "Error from server (NotFound): events.events.k8s.io \"gone.1\" not found",
    );
    let incomplete =
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {name: bad.1, namespace: shop}\n\
        reason: Started\ntype: Info\n";
    let out = k.stdin(&["create", "-f", "-"], incomplete);
    let text = describe(&out);
    assert!(!out.status.success(), "{text}");
    for needle in [
        "The Event \"bad.1\" is invalid",
        "eventTime: Required value",
        "reportingController: Required value",
        "type: Unsupported value: \"Info\"",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
}

/// Unpadded URL-safe base64 (continue tokens).
fn b64encode_url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// `kubectl get ... -w` in the background; its stdout lines arrive on the receiver.
fn watch_lines(k: &Kubectl, args: &[&str]) -> (Proc, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("/usr/bin/kubectl")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", k.home.path())
        .env("KUBECONFIG", &k.kubeconfig)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl get -w");
    let lines = lines_from(child.stdout.take().expect("watch stdout"));
    (Proc(child), lines)
}

fn lines_from(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn kubectl_session_against_flotilla_up_which_comes_back_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("cluster");
    let (api, store, peer) = (free_port(), free_port(), free_port());
    let args = [
        "up".to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--secure-port".into(),
        api.to_string(),
        "--store-port".into(),
        store.to_string(),
        "--store-peer-port".into(),
        peer.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = spawn(&args, &dir.path().join("up.log"));
    let k = Kubectl::new(data.join("admin.kubeconfig"));
    k.wait_ready();
    session(&k);

    // Secrets are encrypted at rest: the store holds ciphertext, not the password.
    let raw = etcdctl(
        &format!("127.0.0.1:{store}"),
        &["get", "/registry/secrets/tools/pw", "--print-value-only"],
        None,
    );
    let raw = stdout_ok(&raw, &["get"]);
    assert!(raw.starts_with("k8s:enc:aesgcm:v1:key1:"), "{raw}");
    assert!(
        !raw.contains("czNjcmV0") && !raw.contains("s3cret"),
        "{raw}"
    );
    // Config maps are not.
    let cm = etcdctl(
        &format!("127.0.0.1:{store}"),
        &[
            "get",
            "/registry/configmaps/tools/gen",
            "--print-value-only",
        ],
        None,
    );
    assert!(stdout_ok(&cm, &["get"]).starts_with('{'));

    // A wrong token: 401.
    let anonymous = Command::new("/usr/bin/kubectl")
        .env_clear()
        .env("HOME", k.home.path())
        .args([
            &format!("--server=https://127.0.0.1:{api}"),
            "--insecure-skip-tls-verify",
            "--token=not-a-token",
            "get",
            "ns",
        ])
        .output()
        .expect("kubectl");
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("Unauthorized"),
        "{}",
        describe(&anonymous)
    );

    // A client certificate signed by the cluster CA: its CommonName is the user, its
    // Organizations the groups. One from another CA does not get in.
    let pki = data.join("pki");
    let (ca, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
    let cert_dir = dir.path().join("client");
    let issued = client_certificate(&cert_dir, "jane", "devs", Some((&ca, &ca_key)));
    let whoami = Command::new("/usr/bin/kubectl")
        .env_clear()
        .env("HOME", k.home.path())
        .args([
            &format!("--server=https://127.0.0.1:{api}"),
            &format!("--certificate-authority={}", ca.display()),
            &format!("--client-certificate={}", issued.0.display()),
            &format!("--client-key={}", issued.1.display()),
            "auth",
            "whoami",
        ])
        .output()
        .expect("kubectl");
    let text = stdout_ok(&whoami, &["auth", "whoami"]);
    assert!(
        text.contains("jane") && text.contains("[devs system:authenticated]"),
        "{text}"
    );
    let stranger = client_certificate(&dir.path().join("other"), "mallory", "devs", None);
    let refused = Command::new("/usr/bin/kubectl")
        .env_clear()
        .env("HOME", k.home.path())
        .args([
            &format!("--server=https://127.0.0.1:{api}"),
            &format!("--certificate-authority={}", ca.display()),
            &format!("--client-certificate={}", stranger.0.display()),
            &format!("--client-key={}", stranger.1.display()),
            "get",
            "ns",
        ])
        .output()
        .expect("kubectl");
    assert!(!refused.status.success(), "{}", describe(&refused));

    // Ctrl-C, then the same cluster again.
    let pid = up.0.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let mut up = up;
    let stopped = poll(Duration::from_secs(20), || up.0.try_wait().ok().flatten());
    assert!(stopped.is_some(), "flotilla up did not stop on SIGINT");
    let _again = spawn(&args, &dir.path().join("up2.log"));
    k.wait_ready();
    assert_eq!(
        k.ok(&["get", "secret", "pw", "-n", "tools", "-o", "name"]),
        "secret/pw\n"
    );
}

/// A client key and certificate for `cn` in organization `org` (with openssl), signed by
/// `ca` (certificate, key) or self-signed; returns (certificate, key) paths.
fn client_certificate(
    dir: &Path,
    cn: &str,
    org: &str,
    ca: Option<(&Path, &Path)>,
) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("cert dir");
    let (cert, key, csr) = (dir.join("c.crt"), dir.join("c.key"), dir.join("c.csr"));
    let subject = format!("/CN={cn}/O={org}");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    };
    let (k, c, r) = (
        key.display().to_string(),
        cert.display().to_string(),
        csr.display().to_string(),
    );
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &k,
    ]);
    match ca {
        Some((ca_cert, ca_key)) => {
            run(&["req", "-new", "-key", &k, "-subj", &subject, "-out", &r]);
            let (cc, ck) = (ca_cert.display().to_string(), ca_key.display().to_string());
            // Extensions make it an X.509 v3 certificate (v1 ones are refused).
            let ext = dir.join("ext");
            std::fs::write(
                &ext,
                "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
            )
            .expect("extensions file");
            let e = ext.display().to_string();
            run(&[
                "x509",
                "-req",
                "-in",
                &r,
                "-CA",
                &cc,
                "-CAkey",
                &ck,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &e,
                "-out",
                &c,
            ]);
        }
        None => run(&[
            "req", "-x509", "-new", "-key", &k, "-subj", &subject, "-days", "1", "-out", &c,
        ]),
    }
    (cert, key)
}

/// `flotilla apiserver` with its own serving certificate and kubeconfig under `dir`, and
/// the secrets key in `key_file` (replicas must share it).
fn apiserver(dir: &Path, etcd_servers: &str, key_file: &Path) -> (Proc, Kubectl) {
    let port = free_port();
    let certs = dir.display().to_string();
    let proc = spawn(
        &[
            "apiserver",
            "--etcd-servers",
            etcd_servers,
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &port.to_string(),
            "--cert-dir",
            &certs,
            "--encryption-key-file",
            &key_file.display().to_string(),
        ],
        &dir.join("apiserver.log"),
    );
    // It makes its serving certificate, an admin token and a kubeconfig in --cert-dir.
    let made = poll(READY_TIMEOUT, || {
        dir.join("admin.kubeconfig").exists().then_some(())
    });
    assert!(made.is_some(), "no kubeconfig made in {}", dir.display());
    (proc, Kubectl::new(dir.join("admin.kubeconfig")))
}

#[test]
fn three_apiservers_on_one_store_serve_one_cluster() {
    let mut c = Cluster::start(3);
    let endpoints: Vec<String> = (0..3)
        .map(|i| format!("http://{}", c.endpoint(i)))
        .collect();
    let servers = endpoints.join(",");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let key = dirs[0].path().join("shared-secrets.key");
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").expect("key file");
    let mut servers_up: Vec<(Proc, Kubectl)> = dirs
        .iter()
        .map(|d| apiserver(d.path(), &servers, &key))
        .collect();
    for (_, k) in &servers_up {
        k.wait_ready();
    }
    // Writes through the first, a watch through the second sees every change in order.
    let (a, b) = (&servers_up[0].1, &servers_up[1].1);
    let ns = a.stdin(
        &["create", "-f", "-", "--validate=false"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: multi\n",
    );
    assert!(ns.status.success(), "{}", describe(&ns));
    let (watch, lines) = watch_lines(
        b,
        &[
            "get",
            "cm",
            "-n",
            "multi",
            "-w",
            "-o",
            "jsonpath={.metadata.name}={.data.count}{\"\\n\"}",
        ],
    );
    let doc =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: counter\ndata:\n  count: \"0\"\n";
    let out = a.stdin(
        &["create", "-n", "multi", "-f", "-", "--validate=false"],
        doc,
    );
    assert!(out.status.success(), "{}", describe(&out));
    for n in 1..=5 {
        a.ok(&[
            "patch",
            "cm",
            "counter",
            "-n",
            "multi",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"data":{{"count":"{n}"}}}}"#),
        ]);
    }
    let seen: Vec<String> = (0..6)
        .map(|_| lines.recv_timeout(POLL_TIMEOUT).expect("a watch line"))
        .collect();
    let want: Vec<String> = (0..6).map(|n| format!("counter={n}")).collect();
    assert_eq!(seen, want);
    drop(watch);

    // Kill one apiserver and one store member: kubectl through another carries on.
    drop(servers_up.remove(0));
    let follower = (0..3).find(|&i| Some(i) != c.try_leader()).unwrap_or(0);
    c.kill(follower);
    let k = &servers_up[1].1;
    let out = k.stdin(
        &["create", "-n", "multi", "-f", "-", "--validate=false"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: after\n",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(k
        .ok(&["get", "cm", "-n", "multi", "-o", "name"])
        .contains("configmap/after"));
    assert!(servers_up[0]
        .1
        .ok(&["get", "cm", "after", "-n", "multi", "-o", "name"])
        .contains("after"));
    // A secret written through one replica reads back through another (same key).
    k.ok(&[
        "create",
        "secret",
        "generic",
        "shared",
        "-n",
        "multi",
        "--from-literal=k=v",
    ]);
    let v = servers_up[0].1.ok(&[
        "get",
        "secret",
        "shared",
        "-n",
        "multi",
        "-o",
        "jsonpath={.data.k}",
    ]);
    assert_eq!(b64decode(&v), b"v");
}

#[test]
fn the_same_session_on_debian_etcd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
    let _etcd = Proc(
        Command::new("/usr/bin/etcd")
            .args([
                "--name",
                "e0",
                "--data-dir",
                &dir.path().join("etcd").display().to_string(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("e0={peer_url}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting etcd"),
    );
    let api_dir = dir.path().join("api");
    std::fs::create_dir_all(&api_dir).expect("api dir");
    let key = api_dir.join("secrets.key.b64");
    std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").expect("key file");
    let (_api, k) = apiserver(&api_dir, &client_url, &key);
    k.wait_ready();
    session(&k);
}

#[test]
fn bad_input_gets_a_status_saying_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("cluster");
    let (api, store, peer) = (free_port(), free_port(), free_port());
    let (api_s, store_s, peer_s) = (api.to_string(), store.to_string(), peer.to_string());
    let data_s = data.display().to_string();
    let _up = spawn(
        &[
            "up",
            "--data-dir",
            &data_s,
            "--secure-port",
            &api_s,
            "--store-port",
            &store_s,
            "--store-peer-port",
            &peer_s,
        ],
        &dir.path().join("up.log"),
    );
    let k = Kubectl::new(data.join("admin.kubeconfig"));
    k.wait_ready();
    let file = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("writing a body");
        p.display().to_string()
    };
    let post = |body_file: &str| {
        k.run(&[
            "create",
            "--raw",
            "/api/v1/namespaces/default/configmaps",
            "-f",
            body_file,
        ])
    };
    let expect = |out: Output, needle: &str| {
        assert!(
            !out.status.success() && stderr(&out).contains(needle),
            "expected {needle:?}: {}",
            describe(&out)
        );
    };
    expect(
        post(&file("malformed.json", "{\"apiVersion\": \"v1\", ")),
        "Error from server (BadRequest): the object provided is unrecognized (must be of type JSON)",
    );
    expect(
        post(&file("yaml.json", "apiVersion: v1\nkind: ConfigMap\n")),
        "Error from server (BadRequest)",
    );
    expect(
        post(&file(
            "version.json",
            r#"{"apiVersion":"v2","kind":"ConfigMap","metadata":{"name":"x"}}"#,
        )),
        "Error from server (BadRequest): the API version \"v2\"",
    );
    expect(
        post(&file(
            "kind.json",
            r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"x"}}"#,
        )),
        "Error from server (BadRequest): the kind \"Secret\"",
    );
    expect(
        post(&file(
            "noname.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{}}"#,
        )),
        "metadata.name: Required value",
    );
    // Through --raw there is no fieldValidation parameter: the default (Warn) drops the
    // unknown field and says so; under Strict it is refused.
    let strict = k.run(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/configmaps?fieldValidation=Strict",
        "-f",
        &file(
            "strict.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"},"bogus":1}"#,
        ),
    ]);
    expect(strict, "strict decoding error: unknown field \"bogus\"");
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"a":"{}"}}}}"#,
        "x".repeat(4 << 20)
    );
    expect(
        post(&file("big.json", &big)),
        "Error from server (RequestEntityTooLarge)",
    );
    expect(
        k.run(&["get", "--raw", "/api/v1/configmaps?labelSelector=a+in+b"]),
        "Error from server (BadRequest): unable to parse requirement",
    );
    expect(
        k.run(&["get", "--raw", "/api/v1/configmaps?continue=zzz"]),
        "Error from server (BadRequest): continue key is not valid",
    );
    expect(
        k.run(&[
            "get",
            "--raw",
            "/api/v1/configmaps?fieldSelector=spec.nope%3D1",
        ]),
        "field label not supported: spec.nope",
    );
    expect(
        post(&file(
            "types.json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"t"},"data":{"a":1}}"#,
        )),
        "cannot be handled as a ConfigMap: data.a: expected a string, got a number",
    );
    // A namespaced kind is written only in a namespace.
    expect(
        k.run(&[
            "create",
            "--raw",
            "/api/v1/configmaps",
            "-f",
            &file(
                "ok.json",
                r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"n"}}"#,
            ),
        ]),
        "MethodNotAllowed",
    );
    // A continue token from one list does not continue another.
    let token_json = r#"{"v":1,"rv":1,"start":"L3JlZ2lzdHJ5L3NlY3JldHMv"}"#;
    let token = b64encode_url(token_json.as_bytes());
    expect(
        k.run(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/zzz/secrets?limit=1&continue={token}"),
        ]),
        "continue key is not valid",
    );
    expect(
        k.run(&["delete", "namespace", "kube-system"]),
        "Error from server (Forbidden): namespaces \"kube-system\" is forbidden",
    );
    k.ok(&["create", "configmap", "target", "--from-literal=a=b"]);
    expect(
        k.run(&["patch", "cm", "target", "-p", r#"{"$patch":"bogus"}"#]),
        "the patch does not apply: unknown patch type: bogus",
    );
    expect(
        k.run(&[
            "patch",
            "cm",
            "target",
            "--type",
            "json",
            "-p",
            r#"[{"op":"move","from":"/nope","path":"/x"}]"#,
        ]),
        "the patch does not apply",
    );
    expect(
        k.run(&[
            "patch",
            "cm",
            "target",
            "--type",
            "merge",
            "-p",
            r#"{"metadata":{"name":"renamed"}}"#,
        ]),
        "Error from server (BadRequest)",
    );
    // Still healthy, and nothing it refused was written.
    assert_eq!(k.ok(&["get", "--raw", "/readyz"]), "ok");
    let names = k.ok(&["get", "cm", "-o", "name"]);
    assert_eq!(names, "configmap/target\n", "{names}");
    let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}
