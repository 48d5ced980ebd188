//! Auth, driven by etcdctl as an operator would: off by default; `auth enable` needs a root
//! user; then unauthenticated and unauthorised requests get etcd's errors while permitted
//! ones pass, on every member, and all of it survives kill -9 of the whole cluster.

mod common;

use std::time::Duration;

use common::*;

const ROOT: &str = "root:rootpw";
const ALICE: &str = "alice:alicepw";

fn as_user(c: &Cluster, user: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--user", user];
    all.extend_from_slice(args);
    c.etcdctl_live(&all)
}

fn ok_as(c: &Cluster, user: &str, args: &[&str]) -> String {
    stdout_ok(&as_user(c, user, args), args)
}

const DENIED: &str = "etcdserver: permission denied";
const NO_USER: &str = "etcdserver: user name is empty";
const BAD_LOGIN: &str = "etcdserver: authentication failed, invalid user ID or password";

#[test]
fn auth_refuses_unauthenticated_and_unauthorised_requests_on_every_member() {
    let mut c = Cluster::start(3);
    c.ok(&["put", "open", "1"]);
    assert_fails_with(
        &c.etcdctl(&["auth", "enable"]),
        "etcdserver: root user does not exist",
    );
    assert_eq!(c.ok(&["user", "add", ROOT]), "User root created\n");
    // etcdctl meets "root user does not have root role", adds the role and tries again.
    assert_eq!(c.ok(&["auth", "enable"]), "Authentication Enabled\n");

    // Without credentials, or with wrong ones: refused.
    assert_fails_with(&c.etcdctl(&["get", "open"]), NO_USER);
    assert_fails_with(&c.etcdctl(&["put", "open", "2"]), NO_USER);
    assert_fails_with(&as_user(&c, "root:wrong", &["get", "open"]), BAD_LOGIN);
    assert_fails_with(&as_user(&c, "nobody:x", &["get", "open"]), BAD_LOGIN);
    assert_eq!(
        ok_as(&c, ROOT, &["get", "open", "--print-value-only"]),
        "1\n"
    );

    // A role limited to a prefix (read-write) and one key (read-only).
    for args in [
        &["role", "add", "app"][..],
        &[
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "app/",
            "--prefix",
        ],
        &["role", "grant-permission", "app", "read", "cfg"],
        &["user", "add", ALICE],
        &["user", "grant-role", "alice", "app"],
    ] {
        ok_as(&c, ROOT, args);
    }
    ok_as(&c, ROOT, &["put", "cfg", "x"]);

    assert_eq!(ok_as(&c, ALICE, &["put", "app/a", "1"]), "OK\n");
    assert_eq!(
        ok_as(
            &c,
            ALICE,
            &["get", "app/", "--prefix", "--print-value-only"]
        ),
        "1\n"
    );
    assert_eq!(
        ok_as(&c, ALICE, &["get", "cfg", "--print-value-only"]),
        "x\n"
    );
    for args in [
        &["put", "other", "1"][..],
        &["get", "other"],
        &["put", "cfg", "y"],
        &["del", "cfg"],
        &["get", "", "--prefix"],
        &["get", "app/", "--from-key"],
        &["user", "list"],
        &["role", "add", "mine"],
        &["member", "add", "x", "--peer-urls=http://127.0.0.1:1"],
        &["defrag"],
    ] {
        assert_fails_with(&as_user(&c, ALICE, args), DENIED);
    }
    // Keys on someone else's lease: alice may neither attach to it nor list its keys.
    let granted = ok_as(&c, ROOT, &["lease", "grant", "600"]);
    let lease = granted
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease grant printed {granted:?}"))
        .to_string();
    ok_as(
        &c,
        ROOT,
        &["put", "secret", "s", &format!("--lease={lease}")],
    );
    assert_fails_with(
        &as_user(
            &c,
            ALICE,
            &["put", "app/l", "v", &format!("--lease={lease}")],
        ),
        DENIED,
    );
    assert_fails_with(
        &as_user(&c, ALICE, &["lease", "timetolive", &lease, "--keys"]),
        DENIED,
    );
    assert_fails_with(&as_user(&c, ALICE, &["lease", "revoke", &lease]), DENIED);
    // Her own lease is hers to use.
    let own = ok_as(&c, ALICE, &["lease", "grant", "600"]);
    let own = own
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        ok_as(&c, ALICE, &["put", "app/l", "v", &format!("--lease={own}")]),
        "OK\n"
    );
    ok_as(&c, ALICE, &["lease", "timetolive", &own, "--keys"]);

    // A Txn needs every operation in both branches permitted.
    let txn = c.etcdctl_stdin(
        &["--user", ALICE, "txn"],
        b"\nput app/t 1\n\nput other 1\n\n",
    );
    assert_fails_with(&txn, DENIED);
    let txn = c.etcdctl_stdin(
        &["--user", ALICE, "txn"],
        b"value(\"app/a\") = \"1\"\n\nput app/t 1\n\nget cfg\n\n",
    );
    assert_eq!(stdout_ok(&txn, &["txn"]), "SUCCESS\n\nOK\n");
    // A user may look at itself, and at roles it holds.
    assert_eq!(
        ok_as(&c, ALICE, &["user", "get", "alice"]),
        "User: alice\nRoles: app\n"
    );
    assert_fails_with(&as_user(&c, ALICE, &["user", "get", "root"]), DENIED);
    // A watch on keys it may not read is cancelled with etcd's reason.
    let mut w = Watch::spawn(&c.endpoints(), &["--user", ALICE, "other"]);
    let (_, watch_err) = w
        .wait_exit(Duration::from_secs(20))
        .expect("a forbidden watch is cancelled");
    assert!(
        watch_err.iter().any(|l| l.contains(DENIED)),
        "watch stderr: {watch_err:?}"
    );
    // Backups are for root: `flotilla store snapshot save --user` as etcdctl's.
    let backup = c.dir().join("auth.backup");
    let backup_s = backup.display().to_string();
    let ep = format!("http://{}", c.endpoint(0));
    let save = |user: Option<&str>| {
        let mut args = vec!["store", "snapshot", "save", &backup_s, "--endpoints", &ep];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        flotilla(&args)
    };
    let out = save(None);
    assert!(
        !out.status.success() && stderr(&out).contains(NO_USER),
        "{}",
        describe(&out)
    );
    let out = save(Some(ALICE));
    assert!(
        !out.status.success() && stderr(&out).contains(DENIED),
        "{}",
        describe(&out)
    );
    let out = save(Some(ROOT));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(backup.exists());

    // Restored, the users and permissions come along; the token key does not (a backup
    // holder must not be able to sign tokens), and the new cluster chooses its own.
    let mut restored = Cluster::prepare(1);
    let m = &restored.members[0];
    let out = flotilla(&[
        "store",
        "snapshot",
        "restore",
        &backup_s,
        "--data-dir",
        &m.data_dir.display().to_string(),
        "--name",
        &m.name,
        "--initial-cluster",
        restored.initial_cluster(),
        "--initial-cluster-token",
        restored.token(),
        "--initial-advertise-peer-urls",
        &m.peer_url(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    restored.restart(0);
    let up = poll(READY_TIMEOUT, || {
        as_user(&restored, ALICE, &["get", "cfg", "--print-value-only"])
            .status
            .success()
            .then_some(())
    });
    if up.is_none() {
        restored.fail("alice could not log in to the restored cluster");
    }
    assert_fails_with(&as_user(&restored, ALICE, &["put", "other", "1"]), DENIED);
    assert_fails_with(&restored.etcdctl(&["get", "cfg"]), NO_USER);
    drop(restored);

    // Locking oneself out is refused.
    assert_fails_with(
        &as_user(&c, ROOT, &["user", "delete", "root"]),
        "etcdserver: invalid auth management",
    );
    assert_fails_with(
        &as_user(&c, ROOT, &["user", "revoke-role", "alice", "root"]),
        "etcdserver: role is not granted to the user",
    );

    // Every member enforces the same state, before and after kill -9 of all of them.
    let check_members = |c: &Cluster| {
        for i in 0..c.len() {
            let ep = c.endpoint(i);
            let at = |user: Option<&str>, args: &[&str]| {
                let mut all: Vec<&str> = Vec::new();
                if let Some(u) = user {
                    all.extend(["--user", u]);
                }
                all.extend_from_slice(args);
                etcdctl(&ep, &all, None)
            };
            assert_eq!(
                stdout_ok(&at(Some(ALICE), &["put", "app/m", "v"]), &["put"]),
                "OK\n",
                "member {i}"
            );
            assert_fails_with(&at(Some(ALICE), &["put", "other", "v"]), DENIED);
            assert_fails_with(&at(None, &["get", "app/m"]), NO_USER);
        }
    };
    check_members(&c);
    for i in 0..c.len() {
        c.kill(i);
    }
    for i in 0..c.len() {
        c.restart(i);
    }
    let back = poll(READY_TIMEOUT, || {
        (0..c.len())
            .all(|i| {
                etcdctl(&c.endpoint(i), &["--user", ROOT, "get", "cfg"], None)
                    .status
                    .success()
            })
            .then_some(())
    });
    if back.is_none() {
        c.fail("the cluster did not come back with auth on");
    }
    check_members(&c);

    // Revoking a permission takes effect at once.
    ok_as(
        &c,
        ROOT,
        &["role", "revoke-permission", "app", "app/", "--prefix"],
    );
    assert_fails_with(&as_user(&c, ALICE, &["put", "app/a", "2"]), DENIED);
    assert_fails_with(&as_user(&c, ALICE, &["get", "app/a"]), DENIED);
    // A changed password works at once; the old one does not.
    let passwd = c.etcdctl_stdin(
        &[
            "--user",
            ROOT,
            "user",
            "passwd",
            "alice",
            "--interactive=false",
        ],
        b"newpw\n",
    );
    assert_eq!(
        stdout_ok(&passwd, &["user", "passwd"]),
        "Password updated\n"
    );
    assert_fails_with(&as_user(&c, ALICE, &["get", "cfg"]), BAD_LOGIN);
    assert_eq!(
        ok_as(&c, "alice:newpw", &["get", "cfg", "--print-value-only"]),
        "x\n"
    );

    // Auth off again: anyone may read and write.
    assert_eq!(
        ok_as(&c, ROOT, &["auth", "disable"]),
        "Authentication Disabled\n"
    );
    assert_eq!(c.ok(&["get", "open", "--print-value-only"]), "1\n");
    c.ok(&["put", "open", "3"]);
}
