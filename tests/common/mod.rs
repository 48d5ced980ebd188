//! Black-box test harness: real `flotilla store` processes on loopback, driven by Debian's
//! real `etcdctl` (v3.4, API v3) as the client.
//!
//! Every wait here is bounded and polls for a condition; nothing sleeps to "let things
//! settle" and no test asserts on timing.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// How long `wait_ready` and the other "until the cluster is up" waits try.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a poll for an eventual condition (a new leader, a caught-up follower, an
/// expired lease) tries.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Ports are taken below the kernel's ephemeral range (32768..), so no outgoing
/// connection (etcdctl's, the members' own) can be holding one, from a window that
/// depends on the process id, so test binaries running at the same time start in
/// different places; each candidate is also checked by binding it.
const PORT_LOW: u32 = 15_000;
const PORT_SPAN: u32 = 17_000;
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

pub fn free_port() -> u16 {
    let start = (std::process::id() % 97) * 170;
    for _ in 0..PORT_SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (PORT_LOW + (start + n) % PORT_SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1");
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `http` or `https` for the peer URL.
    pub peer_scheme: &'static str,
    child: Option<Child>,
    /// For a member that joins a running cluster: the `--initial-cluster` it starts with
    /// (and `--initial-cluster-state existing`).
    joins: Option<String>,
}

impl Member {
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_port)
    }
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

pub struct Cluster {
    dir: tempfile::TempDir,
    token: String,
    initial_cluster: String,
    pub members: Vec<Member>,
    /// Flags every member starts with beyond the harness's own.
    extra_args: Vec<String>,
}

impl Cluster {
    /// Starts `n` members of a new cluster and waits until every one of them is healthy.
    pub fn start(n: usize) -> Cluster {
        let mut cluster = Cluster::prepare(n);
        cluster.start_all();
        cluster
    }

    /// Starts every member and waits until all are healthy.
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_ready();
    }

    /// `--initial-cluster` of the members the cluster was made with.
    pub fn initial_cluster(&self) -> &str {
        &self.initial_cluster
    }

    /// `--initial-cluster-token`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Chooses ports and data dirs for `n` members of a new cluster without starting them.
    pub fn prepare(n: usize) -> Cluster {
        Cluster::prepare_peers(n, "http")
    }

    /// As `prepare`, with `https` peer URLs when `peer_scheme` says so (the TLS flags then
    /// go in `extra_args`).
    pub fn prepare_peers(n: usize, peer_scheme: &'static str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-test-")
            .tempdir()
            .expect("creating a temp dir");
        let token = format!(
            "flotilla-test-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        );
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_port: free_port(),
                    peer_port: free_port(),
                    data_dir: dir.path().join(format!("{name}.data")),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    peer_scheme,
                    child: None,
                    joins: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            dir,
            token,
            initial_cluster,
            members,
            extra_args: Vec::new(),
        }
    }

    /// Starts `n` members with extra flags (e.g. `--quota-backend-bytes`).
    pub fn start_with(n: usize, extra_args: &[&str]) -> Cluster {
        Cluster::start_peers_with(n, "http", extra_args)
    }

    /// Starts `n` members with the given peer URL scheme and extra flags.
    pub fn start_peers_with(n: usize, peer_scheme: &'static str, extra_args: &[&str]) -> Cluster {
        let mut cluster = Cluster::prepare_peers(n, peer_scheme);
        cluster.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        cluster.start_all();
        cluster
    }

    /// Replaces the flags members start with from now on (a restart takes them).
    pub fn set_extra_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        assert!(m.child.is_none(), "{} is already running", m.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("opening the member log");
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .arg("store")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args([
                "--initial-cluster",
                m.joins.as_deref().unwrap_or(&self.initial_cluster),
            ])
            .args(["--initial-cluster-token", &self.token])
            .args([
                "--initial-cluster-state",
                if m.joins.is_some() { "existing" } else { "new" },
            ])
            .args(&self.extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning flotilla store");
        self.members[i].child = Some(child);
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Indices of the members whose process this harness has running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect()
    }

    /// `127.0.0.1:P,127.0.0.1:Q,...` for every member (running or not).
    pub fn endpoints(&self) -> String {
        self.endpoints_of(&(0..self.members.len()).collect::<Vec<_>>())
    }

    pub fn endpoints_of(&self, members: &[usize]) -> String {
        members
            .iter()
            .map(|&i| self.members[i].endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    /// Runs etcdctl against every member's endpoint.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoints(), args, None)
    }

    /// Runs etcdctl against member `i` only.
    pub fn etcdctl_at(&self, i: usize, args: &[&str]) -> Output {
        etcdctl(&self.endpoint(i), args, None)
    }

    /// Runs etcdctl against the given members.
    pub fn etcdctl_on(&self, members: &[usize], args: &[&str]) -> Output {
        etcdctl(&self.endpoints_of(members), args, None)
    }

    /// Runs etcdctl against every running member, feeding `stdin`.
    pub fn etcdctl_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        etcdctl(&self.endpoints_of(&self.running()), args, Some(stdin))
    }

    /// Runs etcdctl against every running member.
    pub fn etcdctl_live(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoints_of(&self.running()), args, None)
    }

    /// Runs etcdctl against every running member and returns its stdout; panics (showing
    /// stderr) if it failed.
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_ok(&self.etcdctl_live(args), args)
    }

    /// Like `ok`, parsing `-w json` output (the flag is added here).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-w", "json"]);
        parse_json(&self.ok(&a))
    }

    /// The current revision, from a linearizable `get` header.
    pub fn revision(&self) -> i64 {
        self.json(&["get", "flotilla-test-revision-probe"])["header"]["revision"]
            .as_i64()
            .expect("header.revision")
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.members[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("member {i} is not running"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts member `i` again with the same flags and data dir.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Makes room for a new member (ports, data dir) without starting it; returns its index.
    pub fn new_member(&mut self) -> usize {
        let i = self.members.len();
        let name = format!("m{i}");
        self.members.push(Member {
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: self.dir.path().join(format!("{name}.data")),
            log: self.dir.path().join(format!("{name}.log")),
            name,
            peer_scheme: self.members.first().map_or("http", |m| m.peer_scheme),
            child: None,
            joins: None,
        });
        i
    }

    /// Starts member `i` as a newcomer to the running cluster, which lists it in
    /// `initial_cluster` (after `member add`).
    pub fn start_joining(&mut self, i: usize, initial_cluster: &str) {
        self.members[i].joins = Some(initial_cluster.to_string());
        self.spawn(i);
    }

    /// The process of member `i`, if the harness started it, has not exited.
    pub fn is_alive(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// `endpoint status -w json` of member `i`: (member_id, leader, revision), if it answers.
    pub fn status(&self, i: usize) -> Option<(u64, u64, i64)> {
        let out = self.etcdctl_at(i, &["endpoint", "status", "-w", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let s = &v[0]["Status"];
        Some((
            s["header"]["member_id"].as_u64()?,
            s["leader"].as_u64().unwrap_or(0),
            s["header"]["revision"].as_i64().unwrap_or(0),
        ))
    }

    /// Member ID of member `i`, from its own `endpoint status`.
    pub fn member_id(&self, i: usize) -> u64 {
        poll(READY_TIMEOUT, || self.status(i).map(|s| s.0))
            .unwrap_or_else(|| self.fail(&format!("member {i} never answered endpoint status")))
    }

    /// Index of the leader if every running member answers and all of them name the same
    /// leader, which is one of them.
    pub fn try_leader(&self) -> Option<usize> {
        let running = self.running();
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for &i in &running {
            let (id, leader, _) = self.status(i)?;
            ids.push((i, id));
            leaders.push(leader);
        }
        let first = *leaders.first()?;
        if first == 0 || leaders.iter().any(|&l| l != first) {
            return None;
        }
        ids.iter().find(|(_, id)| *id == first).map(|(i, _)| *i)
    }

    /// Index of the leader, polling (bounded) until the running members agree on one.
    pub fn leader(&self) -> usize {
        poll(POLL_TIMEOUT, || self.try_leader())
            .unwrap_or_else(|| self.fail("the running members did not agree on a leader"))
    }

    /// Polls `endpoint health` of every running member until all are healthy.
    pub fn wait_ready(&self) {
        let eps = self.endpoints_of(&self.running());
        let mut last = None;
        let ok = poll(READY_TIMEOUT, || {
            let out = etcdctl(&eps, &["endpoint", "health"], None);
            let good = out.status.success();
            last = Some(out);
            good.then_some(())
        });
        if ok.is_none() {
            let last = last.map(|o| describe(&o)).unwrap_or_default();
            self.fail(&format!(
                "cluster not healthy within {READY_TIMEOUT:?}; last endpoint health: {last}"
            ));
        }
    }

    /// Panics with `msg` and the tail of every member's log.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.log_tails());
    }

    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        for m in &self.members {
            s.push_str(&format!(
                "----- {} ({}) log tail -----\n",
                m.name,
                m.log.display()
            ));
            s.push_str(&tail(&m.log, 40));
        }
        s
    }

    /// Starts `etcdctl watch <args>` against every running member, reading its output.
    pub fn watch(&self, args: &[&str]) -> Watch {
        Watch::spawn(&self.endpoints_of(&self.running()), args)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(no log)\n".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let mut s = all[all.len().saturating_sub(lines)..].join("\n");
    s.push('\n');
    s
}

fn etcdctl_command(endpoints: &str, args: &[&str]) -> Command {
    let mut c = Command::new(ETCDCTL);
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=3s")
        .arg("--command-timeout=10s")
        .args(args);
    c
}

/// Runs the `flotilla` binary under test with `args`.
pub fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running flotilla")
}

/// Runs etcdctl with `args` against `endpoints`, optionally feeding `stdin`.
pub fn etcdctl(endpoints: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = etcdctl_command(endpoints, args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().expect("spawning etcdctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("etcdctl stdin");
        let input = input.to_vec();
        // Written from a thread so a large input cannot deadlock against the output pipes.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    child.wait_with_output().expect("running etcdctl")
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout of a successful etcdctl run; panics with both streams otherwise.
pub fn stdout_ok(out: &Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        describe(out)
    );
    stdout(out)
}

/// Asserts etcdctl failed and its stderr contains `needle`.
pub fn assert_fails_with(out: &Output, needle: &str) {
    assert!(
        !out.status.success() && stderr(out).contains(needle),
        "expected etcdctl to fail with {needle:?}, got {}",
        describe(out)
    );
}

pub fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// A `etcdctl watch` child whose stdout lines arrive on a channel; killed on drop.
pub struct Watch {
    child: Child,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Watch {
    pub fn spawn(endpoints: &str, args: &[&str]) -> Watch {
        let mut a = vec!["watch"];
        a.extend_from_slice(args);
        let mut child = etcdctl_command(endpoints, &a)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning etcdctl watch");
        Watch {
            lines: lines_of(child.stdout.take().expect("watch stdout")),
            stderr: lines_of(child.stderr.take().expect("watch stderr")),
            child,
            seen: Vec::new(),
        }
    }

    /// The next stdout line, waiting at most `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.seen.push(l.clone());
                Some(l)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Asserts the next stdout lines are exactly `expected` (each waited for, bounded).
    pub fn expect_lines(&mut self, expected: &[&str]) {
        for (n, want) in expected.iter().enumerate() {
            match self.next_line(POLL_TIMEOUT) {
                Some(got) => assert_eq!(
                    got, *want,
                    "watch line {n} of {expected:?}; lines so far: {:?}",
                    self.seen
                ),
                None => panic!(
                    "watch ended or stalled before line {n} ({want:?}) of {expected:?}; \
                     lines so far: {:?}; stderr: {:?}",
                    self.seen,
                    self.stderr_now()
                ),
            }
        }
    }

    /// Waits (bounded) for the watch process to exit; returns (stdout lines not yet read,
    /// all stderr lines), or None if it is still running at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(Vec<String>, Vec<String>)> {
        poll(timeout, || self.child.try_wait().ok().flatten())?;
        let out: Vec<String> = drain(&self.lines, Duration::from_secs(5));
        let err: Vec<String> = drain(&self.stderr, Duration::from_secs(5));
        Some((out, err))
    }

    pub fn stderr_now(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of<R: Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Everything left on a channel whose sender is about to close (the process exited).
fn drain(rx: &Receiver<String>, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut v = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => v.push(l),
            Err(_) => return v,
        }
    }
}

/// Standard base64 (as Go's encoding/json writes `[]byte`), decoded.
pub fn b64decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not base64: {s:?}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A base64 field of `-w json` output, as a string.
pub fn b64str(v: &Value) -> String {
    String::from_utf8(b64decode(
        v.as_str().unwrap_or_else(|| panic!("not a string: {v}")),
    ))
    .expect("utf-8")
}
