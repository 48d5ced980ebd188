//! The test network: one network namespace per node, joined by a bridge in the root
//! namespace, where the harness and its clients run.
//!
//! Node `i` (1-based) lives in namespace `fj-n<i>` with address `172.31.250.<10+i>`; the
//! bridge `fj-br` holds `172.31.250.1`. With `--net-id K` (1 to 9) the names are `fjK-...` and
//! the subnet `172.31.<250-K>.0/24`, so runs with different ids can go on side by side. Partitions are iptables DROP rules on INPUT inside
//! the nodes' namespaces, so clients in the root namespace still reach every node (as in
//! Jepsen, where the control node is never partitioned). Everything is removed on drop,
//! and stale leftovers of an earlier run are removed before a new one starts.

use std::process::Command;

use anyhow::{bail, Context};

use std::sync::atomic::{AtomicUsize, Ordering};

/// Which set of names and which subnet this process uses (`--net-id`).
static NET_ID: AtomicUsize = AtomicUsize::new(0);

/// Chooses the names and subnet (0 to 9); call before anything else here.
pub fn set_net_id(id: usize) -> anyhow::Result<()> {
    if id > 9 {
        bail!("--net-id must be between 0 and 9");
    }
    NET_ID.store(id, Ordering::Relaxed);
    Ok(())
}

fn prefix() -> String {
    match NET_ID.load(Ordering::Relaxed) {
        0 => "fj".to_string(),
        id => format!("fj{id}"),
    }
}

fn bridge() -> String {
    format!("{}-br", prefix())
}

fn subnet() -> String {
    format!("172.31.{}", 250 - NET_ID.load(Ordering::Relaxed))
}

pub struct Net {
    nodes: usize,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

impl Net {
    pub fn namespace(i: usize) -> String {
        format!("{}-n{i}", prefix())
    }

    pub fn ip(i: usize) -> String {
        format!("{}.{}", subnet(), 10 + i)
    }

    /// Builds the bridge and `nodes` namespaces (removing leftovers of an earlier run).
    pub fn create(nodes: usize) -> anyhow::Result<Net> {
        if !(1..=9).contains(&nodes) {
            bail!("--nodes must be between 1 and 9");
        }
        Net::remove_leftovers();
        let net = Net { nodes };
        run(&["ip", "link", "add", &bridge(), "type", "bridge"])
            .context("creating the bridge (root and iproute2 needed)")?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", subnet()),
            "dev",
            &bridge(),
        ])?;
        run(&["ip", "link", "set", &bridge(), "up"])?;
        for i in 1..=nodes {
            let ns = Net::namespace(i);
            let host = format!("{}-v{i}", prefix());
            let peer = format!("{}-p{i}", prefix());
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ])?;
            run(&["ip", "link", "set", &peer, "netns", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Net::ip(i)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "link", "set", &host, "master", &bridge()])?;
            run(&["ip", "link", "set", &host, "up"])?;
        }
        Ok(net)
    }

    /// Removes whatever an earlier, killed run left behind.
    pub fn remove_leftovers() {
        for i in 1..=9 {
            run_quiet(&["ip", "netns", "del", &Net::namespace(i)]);
            run_quiet(&["ip", "link", "del", &format!("{}-v{i}", prefix())]);
        }
        run_quiet(&["ip", "link", "del", &bridge()]);
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// A command that runs `program` inside node `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &Net::namespace(i), program]);
        c
    }

    /// Cuts links: node `i` drops every packet from node `j` unless `connected(i, j)`.
    pub fn cut(&self, connected: impl Fn(usize, usize) -> bool) -> anyhow::Result<()> {
        self.heal()?;
        for i in 1..=self.nodes {
            for j in 1..=self.nodes {
                if j != i && !connected(i, j) {
                    let (ns, src) = (Net::namespace(i), Net::ip(j));
                    run(&[
                        "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &src, "-j",
                        "DROP",
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        for i in 1..=self.nodes {
            run(&[
                "ip",
                "netns",
                "exec",
                &Net::namespace(i),
                "iptables",
                "-F",
                "INPUT",
            ])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        Net::remove_leftovers();
    }
}
