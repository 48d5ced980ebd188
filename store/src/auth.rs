//! Authentication and authorisation, as etcd's auth store: users with passwords and roles,
//! roles with read and write permissions on key ranges, and a `root` role that may do
//! anything. Off until `AuthEnable`, which needs a `root` user holding the `root` role.
//!
//! The state is part of the replicated state machine (the meta record `auth`) and changes only
//! through committed commands, so every member decides alike. A client's write is checked on
//! the member it reached (an early refusal) and again when applied, against the state at that
//! point of the log: a permission revoked before a write commits refuses the write.
//!
//! Tokens are signed, not stored: `hex(user).revision.expiry.hex(mac)`, an HMAC-SHA256 under a
//! key the enabling command carried. Every member accepts a token any member issued, and a
//! restart does not void them. A token issued before the latest auth change is refused with
//! etcd's "revision of auth store is old", which etcd's clients answer by authenticating
//! again; that is also how a deleted user or a changed password takes effect at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_proto::authpb::{permission, Permission};
use flotilla_proto::etcdserverpb::{request_op, RequestOp, TxnRequest};
use flotilla_proto::flotillapb::{auth_change, command, AuthInfo, Command};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::EtcdError;

/// The user and role that may do anything.
pub const ROOT: &str = "root";
/// etcd's default `--auth-token-ttl`.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;
/// etcd's default `--bcrypt-cost`.
pub const DEFAULT_BCRYPT_COST: u32 = 10;
/// Longest user or role name accepted.
pub const MAX_NAME_BYTES: usize = 256;

/// The auth state as the state machine stores it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    pub enabled: bool,
    /// Bumped by every change; tokens older than it are refused.
    pub revision: u64,
    #[serde(with = "serde_bytes")]
    pub token_key: Vec<u8>,
    pub users: BTreeMap<String, UserRecord>,
    pub roles: BTreeMap<String, Vec<PermRecord>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    /// bcrypt hash; empty for a user added with `--no-password`.
    pub password_hash: String,
    pub roles: BTreeSet<String>,
    pub no_password: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PermRecord {
    pub perm_type: i32,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// A half-open key interval; `None` as the end means "to the end of the keyspace".
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// A user's permissions, merged into disjoint sorted intervals.
#[derive(Debug, Default)]
struct UserPerms {
    admin: bool,
    read: Vec<Interval>,
    write: Vec<Interval>,
}

/// The auth state with each user's permissions worked out.
#[derive(Debug, Default)]
pub struct AuthState {
    stored: Stored,
    perms: HashMap<String, UserPerms>,
}

/// What a request needs of the key range it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The interval a request's `key` and `range_end` cover, with etcd's conventions: an empty
/// end is the single key, `"\0"` is every key from `key` on.
fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), Some(end))
    } else if range_end == [0] {
        (key.to_vec(), None)
    } else {
        (key.to_vec(), Some(range_end.to_vec()))
    }
}

fn merge(mut intervals: Vec<Interval>) -> Vec<Interval> {
    intervals.sort();
    let mut out: Vec<Interval> = Vec::with_capacity(intervals.len());
    for (start, end) in intervals {
        if let Some((_, last_end)) = out.last_mut() {
            let touches = match last_end {
                None => true,
                Some(e) => start <= *e,
            };
            if touches {
                let longer = match (&*last_end, &end) {
                    (None, _) => None,
                    (_, None) => None,
                    (Some(a), Some(b)) => Some(a.max(b).clone()),
                };
                *last_end = longer;
                continue;
            }
        }
        out.push((start, end));
    }
    out
}

/// Whether the merged `intervals` contain all of `wanted`.
fn covers(intervals: &[Interval], wanted: &Interval) -> bool {
    let (start, end) = wanted;
    if let Some(e) = end {
        if e <= start {
            return true; // an empty range touches no key
        }
    }
    let i = intervals.partition_point(|(s, _)| s <= start);
    let Some((_, have_end)) = i.checked_sub(1).map(|i| &intervals[i]) else {
        return false;
    };
    match (have_end, end) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(h), Some(e)) => e <= h,
    }
}

impl AuthState {
    pub fn new(stored: Stored) -> AuthState {
        let mut perms = HashMap::new();
        for (name, user) in &stored.users {
            let mut p = UserPerms {
                admin: user.roles.contains(ROOT),
                ..Default::default()
            };
            let (mut read, mut write) = (Vec::new(), Vec::new());
            for role in &user.roles {
                for perm in stored.roles.get(role).into_iter().flatten() {
                    let iv = interval(&perm.key, &perm.range_end);
                    match permission::Type::try_from(perm.perm_type) {
                        Ok(permission::Type::Read) => read.push(iv),
                        Ok(permission::Type::Write) => write.push(iv),
                        Ok(permission::Type::Readwrite) => {
                            read.push(iv.clone());
                            write.push(iv);
                        }
                        Err(_) => {}
                    }
                }
            }
            p.read = merge(read);
            p.write = merge(write);
            perms.insert(name.clone(), p);
        }
        AuthState { stored, perms }
    }

    /// The state before anything was configured: off, at revision 1 (as etcd starts).
    pub fn initial() -> AuthState {
        AuthState::new(Stored {
            revision: 1,
            ..Default::default()
        })
    }

    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    pub fn enabled(&self) -> bool {
        self.stored.enabled
    }

    pub fn revision(&self) -> u64 {
        self.stored.revision
    }

    /// The user a request speaks for, once its token passed: refused if it gave none, if its
    /// token predates the latest auth change, or if the user is gone.
    fn user<'a>(&'a self, info: Option<&'a AuthInfo>) -> Result<&'a UserPerms, EtcdError> {
        let Some(info) = info.filter(|i| !i.user.is_empty()) else {
            return Err(EtcdError::UserEmpty);
        };
        if info.revision < self.stored.revision {
            return Err(EtcdError::AuthOldRevision);
        }
        self.perms
            .get(&info.user)
            .ok_or(EtcdError::PermissionDenied)
    }

    /// Any authenticated user (when auth is on).
    pub fn check_user(&self, info: Option<&AuthInfo>) -> Result<(), EtcdError> {
        if !self.enabled() {
            return Ok(());
        }
        self.user(info).map(|_| ())
    }

    /// Holders of the root role only (when auth is on).
    pub fn check_admin(&self, info: Option<&AuthInfo>) -> Result<(), EtcdError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.user(info)?.admin {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// Whether the user is root, or may read (write) every key of `[key, range_end)`.
    pub fn check_range(
        &self,
        info: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<(), EtcdError> {
        if !self.enabled() {
            return Ok(());
        }
        let user = self.user(info)?;
        let have = match access {
            Access::Read => &user.read,
            Access::Write => &user.write,
        };
        if user.admin || covers(have, &interval(key, range_end)) {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// The permissions every operation of a Txn needs (both branches and its compares), as
    /// etcd asks of a Txn.
    pub fn check_txn(&self, info: Option<&AuthInfo>, txn: &TxnRequest) -> Result<(), EtcdError> {
        if !self.enabled() {
            return Ok(());
        }
        for c in &txn.compare {
            self.check_range(info, &c.key, &c.range_end, Access::Read)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            self.check_op(info, op)?;
        }
        Ok(())
    }

    fn check_op(&self, info: Option<&AuthInfo>, op: &RequestOp) -> Result<(), EtcdError> {
        use request_op::Request;
        match &op.request {
            Some(Request::RequestRange(r)) => {
                self.check_range(info, &r.key, &r.range_end, Access::Read)
            }
            Some(Request::RequestPut(r)) => {
                self.check_range(info, &r.key, &[], Access::Write)?;
                if r.prev_kv {
                    self.check_range(info, &r.key, &[], Access::Read)?;
                }
                Ok(())
            }
            Some(Request::RequestDeleteRange(r)) => {
                self.check_range(info, &r.key, &r.range_end, Access::Write)?;
                if r.prev_kv {
                    self.check_range(info, &r.key, &r.range_end, Access::Read)?;
                }
                Ok(())
            }
            Some(Request::RequestTxn(t)) => self.check_txn(info, t),
            None => Ok(()),
        }
    }

    /// Attaching a key to a lease, or revoking it, touches every key already on the lease:
    /// the user must be allowed to write each (etcd's `checkLeasePuts`).
    pub fn check_lease_keys(
        &self,
        info: Option<&AuthInfo>,
        lease: i64,
        lease_keys: &dyn Fn(i64) -> Result<Vec<Vec<u8>>, EtcdError>,
    ) -> Result<(), EtcdError> {
        if !self.enabled() || lease == 0 || self.user(info)?.admin {
            return self.check_user(info);
        }
        for key in lease_keys(lease)? {
            self.check_range(info, &key, &[], Access::Write)?;
        }
        Ok(())
    }

    /// The leases a Txn's puts attach keys to (both branches, any depth).
    pub fn txn_put_leases(txn: &TxnRequest, out: &mut Vec<i64>) {
        for op in txn.success.iter().chain(&txn.failure) {
            match &op.request {
                Some(request_op::Request::RequestPut(p)) if p.lease != 0 => out.push(p.lease),
                Some(request_op::Request::RequestTxn(t)) => Self::txn_put_leases(t, out),
                _ => {}
            }
        }
    }

    /// The check a command passes when applied. `lease_keys` lists the keys attached to a
    /// lease. The members' own commands (no `auth`) always pass.
    pub fn check_command(
        &self,
        command: &Command,
        lease_keys: &dyn Fn(i64) -> Result<Vec<Vec<u8>>, EtcdError>,
    ) -> Result<(), EtcdError> {
        use command::Request;
        if !self.enabled() {
            return Ok(());
        }
        let Some(info) = command.auth.as_ref() else {
            return Ok(());
        };
        let info = Some(info);
        match &command.request {
            Some(Request::Put(r)) => {
                self.check_range(info, &r.key, &[], Access::Write)?;
                if r.prev_kv {
                    self.check_range(info, &r.key, &[], Access::Read)?;
                }
                self.check_lease_keys(info, r.lease, lease_keys)
            }
            Some(Request::DeleteRange(r)) => {
                self.check_range(info, &r.key, &r.range_end, Access::Write)?;
                if r.prev_kv {
                    self.check_range(info, &r.key, &r.range_end, Access::Read)?;
                }
                Ok(())
            }
            Some(Request::Txn(t)) => {
                self.check_txn(info, t)?;
                let mut leases = Vec::new();
                Self::txn_put_leases(t, &mut leases);
                for lease in leases {
                    self.check_lease_keys(info, lease, lease_keys)?;
                }
                Ok(())
            }
            Some(Request::LeaseRevoke(r)) => self.check_lease_keys(info, r.id, lease_keys),
            Some(Request::Compaction(_)) | Some(Request::LeaseGrant(_)) => self.check_user(info),
            Some(Request::AuthChange(_))
            | Some(Request::Alarm(_))
            | Some(Request::LeaseCheckpoint(_))
            | Some(Request::MemberAttributes(_))
            | None => self.check_admin(info),
        }
    }

    /// Applies a change; `None` if it changed nothing (enabling auth that is on).
    pub fn apply(&self, change: &auth_change::Change) -> Result<Option<Stored>, EtcdError> {
        use auth_change::Change;
        let mut next = self.stored.clone();
        match change {
            Change::Enable(e) => {
                if next.enabled && !next.token_key.is_empty() {
                    return Ok(None);
                }
                if next.enabled {
                    // A restored backup leaves the key out: the leader gives it a new one.
                    next.token_key = e.token_key.clone();
                    next.revision += 1;
                    return Ok(Some(next));
                }
                let root = next.users.get(ROOT).ok_or(EtcdError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(EtcdError::RootRoleNotExist);
                }
                next.enabled = true;
                next.token_key = e.token_key.clone();
            }
            Change::Disable(_) => {
                if !next.enabled {
                    return Ok(None);
                }
                next.enabled = false;
            }
            Change::UserAdd(r) => {
                check_name(&r.name, EtcdError::UserEmpty)?;
                if next.users.contains_key(&r.name) {
                    return Err(EtcdError::UserAlreadyExist);
                }
                let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
                next.users.insert(
                    r.name.clone(),
                    UserRecord {
                        password_hash: if no_password {
                            String::new()
                        } else {
                            r.hashed_password.clone()
                        },
                        roles: BTreeSet::new(),
                        no_password,
                    },
                );
            }
            Change::UserDelete(r) => {
                if next.enabled && r.name == ROOT {
                    return Err(EtcdError::InvalidAuthMgmt);
                }
                next.users.remove(&r.name).ok_or(EtcdError::UserNotFound)?;
            }
            Change::UserChangePassword(r) => {
                let user = next.users.get_mut(&r.name).ok_or(EtcdError::UserNotFound)?;
                if user.no_password {
                    // As etcd: a user without a password cannot be given one.
                    return Err(EtcdError::AuthFailed);
                }
                user.password_hash = r.hashed_password.clone();
            }
            Change::UserGrantRole(r) => {
                if r.role != ROOT && !next.roles.contains_key(&r.role) {
                    return Err(EtcdError::RoleNotFound);
                }
                let user = next.users.get_mut(&r.user).ok_or(EtcdError::UserNotFound)?;
                if !user.roles.insert(r.role.clone()) {
                    return Ok(None);
                }
            }
            Change::UserRevokeRole(r) => {
                if next.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(EtcdError::InvalidAuthMgmt);
                }
                let user = next.users.get_mut(&r.name).ok_or(EtcdError::UserNotFound)?;
                if !user.roles.remove(&r.role) {
                    return Err(EtcdError::RoleNotGranted);
                }
            }
            Change::RoleAdd(r) => {
                check_name(&r.name, EtcdError::RoleEmpty)?;
                if next.roles.contains_key(&r.name) {
                    return Err(EtcdError::RoleAlreadyExist);
                }
                next.roles.insert(r.name.clone(), Vec::new());
            }
            Change::RoleDelete(r) => {
                if next.enabled && r.role == ROOT {
                    return Err(EtcdError::InvalidAuthMgmt);
                }
                next.roles.remove(&r.role).ok_or(EtcdError::RoleNotFound)?;
                for user in next.users.values_mut() {
                    user.roles.remove(&r.role);
                }
            }
            Change::RoleGrantPermission(r) => {
                let perm = r.perm.as_ref().ok_or(EtcdError::PermissionNotGiven)?;
                if permission::Type::try_from(perm.perm_type).is_err() {
                    return Err(EtcdError::PermissionNotGiven);
                }
                let perms = next.roles.get_mut(&r.name).ok_or(EtcdError::RoleNotFound)?;
                let record = PermRecord {
                    perm_type: perm.perm_type,
                    key: perm.key.clone(),
                    range_end: perm.range_end.clone(),
                };
                match perms
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(p) => p.perm_type = perm.perm_type,
                    None => perms.push(record),
                }
                perms.sort_by(|a, b| (&a.key, &a.range_end).cmp(&(&b.key, &b.range_end)));
            }
            Change::RoleRevokePermission(r) => {
                let perms = next.roles.get_mut(&r.role).ok_or(EtcdError::RoleNotFound)?;
                let before = perms.len();
                perms.retain(|p| !(p.key == r.key && p.range_end == r.range_end));
                if perms.len() == before {
                    return Err(EtcdError::PermissionNotGranted);
                }
            }
        }
        next.revision += 1;
        Ok(Some(next))
    }

    pub fn user_roles(&self, name: &str) -> Result<Vec<String>, EtcdError> {
        self.stored
            .users
            .get(name)
            .map(|u| u.roles.iter().cloned().collect())
            .ok_or(EtcdError::UserNotFound)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.stored.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.stored.roles.keys().cloned().collect()
    }

    pub fn role_permissions(&self, name: &str) -> Result<Vec<Permission>, EtcdError> {
        self.stored
            .roles
            .get(name)
            .map(|perms| {
                perms
                    .iter()
                    .map(|p| Permission {
                        perm_type: p.perm_type,
                        key: p.key.clone(),
                        range_end: p.range_end.clone(),
                    })
                    .collect()
            })
            .ok_or(EtcdError::RoleNotFound)
    }

    /// Whether the user may log in with a password, and the hash to check it against.
    pub fn password_hash(&self, name: &str) -> Option<&str> {
        self.stored
            .users
            .get(name)
            .filter(|u| !u.no_password)
            .map(|u| u.password_hash.as_str())
    }

    /// A token for `user` at the current revision, valid until `expiry` (Unix seconds).
    pub fn sign_token(&self, user: &str, expiry: u64) -> String {
        let body = format!(
            "{}.{}.{}",
            hex(user.as_bytes()),
            self.stored.revision,
            expiry
        );
        let mac = self.mac(&body).finalize().into_bytes();
        format!("{body}.{}", hex(&mac))
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.stored.token_key)
            .expect("HMAC takes a key of any length");
        mac.update(body.as_bytes());
        mac
    }

    /// Whether auth is on but tokens cannot be signed yet (a restored backup, until the
    /// leader has chosen a new key).
    pub fn needs_token_key(&self) -> bool {
        self.stored.enabled && self.stored.token_key.is_empty()
    }

    /// Whether this state's key signed the token (expiry and revision aside).
    pub fn signed(&self, token: &str) -> bool {
        let Some(parsed) = parse_token(token) else {
            return false;
        };
        let body_len = token.len() - parsed.mac_hex.len() - 1;
        let Some(mac) = unhex(parsed.mac_hex) else {
            return false;
        };
        !self.stored.token_key.is_empty() && self.mac(&token[..body_len]).verify_slice(&mac).is_ok()
    }

    /// The identity a token proves: this state's key signed it, it has not expired, and it
    /// was issued at a revision this state has reached (no token from the future).
    pub fn verify_token(&self, token: &str, now: u64) -> Result<AuthInfo, EtcdError> {
        if !self.signed(token) {
            return Err(EtcdError::InvalidAuthToken);
        }
        let parsed = parse_token(token).ok_or(EtcdError::InvalidAuthToken)?;
        if parsed.expiry <= now || parsed.revision > self.stored.revision {
            return Err(EtcdError::InvalidAuthToken);
        }
        Ok(AuthInfo {
            user: parsed.user,
            revision: parsed.revision,
        })
    }
}

/// The auth record as a backup carries it: without the token key, so that nobody holding a
/// backup can sign tokens the cluster accepts.
pub fn strip_token_key(record: &[u8]) -> Result<Vec<u8>, crate::error::StorageError> {
    let mut stored: Stored = crate::mvcc::decode("auth", record)?;
    stored.token_key.clear();
    Ok(crate::mvcc::encode(&stored))
}

/// A token's fields, not yet verified.
pub struct TokenFields<'a> {
    pub user: String,
    pub revision: u64,
    pub expiry: u64,
    mac_hex: &'a str,
}

pub fn parse_token(token: &str) -> Option<TokenFields<'_>> {
    let mut parts = token.split('.');
    let user = String::from_utf8(unhex(parts.next()?)?).ok()?;
    let revision = parts.next()?.parse().ok()?;
    let expiry = parts.next()?.parse().ok()?;
    let mac_hex = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some(TokenFields {
        user,
        revision,
        expiry,
        mac_hex,
    })
}

fn check_name(name: &str, empty: EtcdError) -> Result<(), EtcdError> {
    if name.is_empty() {
        return Err(empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(EtcdError::RequestTooLarge);
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A bcrypt hash of `password` (slow by design: run it off the async workers).
pub fn hash_password(password: &str, cost: u32) -> Result<String, EtcdError> {
    bcrypt::hash(password, cost).map_err(|e| EtcdError::Internal(format!("hashing: {e}")))
}

pub fn password_matches(password: &str, hash: &str) -> bool {
    bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::{
        AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
        AuthUserGrantRoleRequest,
    };
    use flotilla_proto::flotillapb::AuthEnable;

    fn apply(state: AuthState, change: auth_change::Change) -> Result<AuthState, EtcdError> {
        Ok(AuthState::new(state.apply(&change)?.expect("a change")))
    }

    fn setup() -> AuthState {
        use auth_change::Change;
        let mut s = AuthState::initial();
        for user in ["root", "alice"] {
            s = apply(
                s,
                Change::UserAdd(AuthUserAddRequest {
                    name: user.into(),
                    hashed_password: "x".into(),
                    ..Default::default()
                }),
            )
            .unwrap();
        }
        for role in ["root", "app"] {
            s = apply(s, Change::RoleAdd(AuthRoleAddRequest { name: role.into() })).unwrap();
        }
        let grant = |s, key: &str, end: &str, t: permission::Type| {
            apply(
                s,
                Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                    name: "app".into(),
                    perm: Some(Permission {
                        perm_type: t as i32,
                        key: key.into(),
                        range_end: end.into(),
                    }),
                }),
            )
            .unwrap()
        };
        s = grant(s, "app/", "app0", permission::Type::Readwrite);
        s = grant(s, "cfg", "", permission::Type::Read);
        s = grant(s, "z", "\0", permission::Type::Read);
        for (user, role) in [("root", "root"), ("alice", "app")] {
            s = apply(
                s,
                Change::UserGrantRole(AuthUserGrantRoleRequest {
                    user: user.into(),
                    role: role.into(),
                }),
            )
            .unwrap();
        }
        apply(
            s,
            Change::Enable(AuthEnable {
                token_key: b"k".to_vec(),
            }),
        )
        .unwrap()
    }

    #[test]
    fn ranges_are_checked_against_merged_permissions() {
        let s = setup();
        let alice = AuthInfo {
            user: "alice".into(),
            revision: s.revision(),
        };
        let a = Some(&alice);
        assert!(s.check_range(a, b"app/x", b"", Access::Write).is_ok());
        assert!(s.check_range(a, b"app/", b"app0", Access::Read).is_ok());
        assert!(s.check_range(a, b"app/a", b"app/b", Access::Read).is_ok());
        assert_eq!(
            s.check_range(a, b"app/", b"\0", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        assert!(s.check_range(a, b"cfg", b"", Access::Read).is_ok());
        assert_eq!(
            s.check_range(a, b"cfg", b"", Access::Write),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            s.check_range(a, b"cfg", b"cfh", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        assert!(s.check_range(a, b"zz", b"\0", Access::Read).is_ok());
        assert_eq!(
            s.check_range(a, b"other", b"", Access::Read),
            Err(EtcdError::PermissionDenied)
        );
        let root = AuthInfo {
            user: "root".into(),
            revision: s.revision(),
        };
        assert!(s
            .check_range(Some(&root), b"\0", b"\0", Access::Write)
            .is_ok());
        assert_eq!(s.check_admin(a), Err(EtcdError::PermissionDenied));
        assert_eq!(
            s.check_range(None, b"app/x", b"", Access::Read),
            Err(EtcdError::UserEmpty)
        );
        let stale = AuthInfo {
            revision: s.revision() - 1,
            ..alice.clone()
        };
        assert_eq!(
            s.check_range(Some(&stale), b"app/x", b"", Access::Read),
            Err(EtcdError::AuthOldRevision)
        );
    }

    #[test]
    fn tokens_verify_only_with_their_key_and_before_expiry() {
        let s = setup();
        let token = s.sign_token("alice", 1_000);
        let info = s.verify_token(&token, 999).unwrap();
        assert_eq!(info.user, "alice");
        assert_eq!(info.revision, s.revision());
        assert_eq!(
            s.verify_token(&token, 1_000),
            Err(EtcdError::InvalidAuthToken)
        );
        let forged = token.replacen(&hex(b"alice"), &hex(b"root"), 1);
        assert_eq!(s.verify_token(&forged, 0), Err(EtcdError::InvalidAuthToken));
        assert_eq!(
            s.verify_token("garbage", 0),
            Err(EtcdError::InvalidAuthToken)
        );
    }

    #[test]
    fn enabling_needs_root_with_the_root_role() {
        use auth_change::Change;
        let enable = Change::Enable(AuthEnable { token_key: vec![1] });
        let s = AuthState::initial();
        assert_eq!(s.apply(&enable).unwrap_err(), EtcdError::RootUserNotExist);
        let s = apply(
            s,
            Change::UserAdd(AuthUserAddRequest {
                name: "root".into(),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(s.apply(&enable).unwrap_err(), EtcdError::RootRoleNotExist);
    }

    #[test]
    fn commands_are_judged_by_the_state_they_are_applied_in() {
        use flotilla_proto::etcdserverpb::{AuthRoleRevokePermissionRequest, PutRequest};
        let s = setup();
        let alice = AuthInfo {
            user: "alice".into(),
            revision: s.revision(),
        };
        let put = |auth: Option<AuthInfo>| Command {
            request: Some(command::Request::Put(PutRequest {
                key: b"app/x".to_vec(),
                ..Default::default()
            })),
            auth,
        };
        let no_leases: &dyn Fn(i64) -> Result<Vec<Vec<u8>>, EtcdError> = &|_| Ok(Vec::new());
        assert!(s
            .check_command(&put(Some(alice.clone())), no_leases)
            .is_ok());
        // Proposed while permitted, applied after the permission went: refused.
        let s = apply(
            s,
            auth_change::Change::RoleRevokePermission(AuthRoleRevokePermissionRequest {
                role: "app".into(),
                key: b"app/".to_vec(),
                range_end: b"app0".to_vec(),
            }),
        )
        .unwrap();
        assert_eq!(
            s.check_command(&put(Some(alice.clone())), no_leases),
            Err(EtcdError::AuthOldRevision)
        );
        let fresh = AuthInfo {
            revision: s.revision(),
            ..alice
        };
        assert_eq!(
            s.check_command(&put(Some(fresh)), no_leases),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            s.check_command(&put(Some(AuthInfo::default())), no_leases),
            Err(EtcdError::UserEmpty)
        );
        // The members' own commands carry no identity and always pass.
        assert!(s.check_command(&put(None), no_leases).is_ok());
    }

    #[test]
    fn a_backup_leaves_the_token_key_out_and_the_restored_cluster_chooses_a_new_one() {
        let s = setup();
        let token = s.sign_token("root", u64::MAX);
        let record = crate::mvcc::encode(s.stored());
        let restored = AuthState::new(
            crate::mvcc::decode("auth", &strip_token_key(&record).unwrap()).unwrap(),
        );
        assert!(restored.needs_token_key());
        assert_eq!(
            restored.verify_token(&token, 0),
            Err(EtcdError::InvalidAuthToken)
        );
        let rekeyed = apply(
            restored,
            auth_change::Change::Enable(AuthEnable {
                token_key: b"new".to_vec(),
            }),
        )
        .unwrap();
        assert!(!rekeyed.needs_token_key());
        assert_eq!(rekeyed.revision(), s.revision() + 1);
        assert_eq!(
            rekeyed.verify_token(&token, 0),
            Err(EtcdError::InvalidAuthToken)
        );
        let fresh = rekeyed.sign_token("root", u64::MAX);
        assert_eq!(rekeyed.verify_token(&fresh, 0).unwrap().user, "root");
        // Enabling again changes nothing.
        assert!(rekeyed
            .apply(&auth_change::Change::Enable(AuthEnable {
                token_key: b"other".to_vec()
            }))
            .unwrap()
            .is_none());
    }

    #[test]
    fn merge_joins_overlapping_and_touching_intervals() {
        let iv = |a: &str, b: Option<&str>| (a.as_bytes().to_vec(), b.map(|b| b.into()));
        let merged = merge(vec![iv("c", Some("e")), iv("a", Some("c")), iv("x", None)]);
        assert_eq!(merged, vec![iv("a", Some("e")), iv("x", None)]);
        assert!(covers(&merged, &iv("b", Some("d"))));
        assert!(!covers(&merged, &iv("b", Some("f"))));
        assert!(covers(&merged, &iv("y", None)));
    }
}
