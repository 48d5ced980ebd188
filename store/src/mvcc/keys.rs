//! Byte layouts of the MVCC column families.
//!
//! `kv`: `escape(user_key) 0x00 0x01 !revision` → [`KvRecord`]. Escaping keeps byte order
//! between user keys, and the inverted revision puts the newest version of a key first, so a
//! read at any revision is one seek and no index of all keys is ever held in memory.
//!
//! `rev`: `revision sub` (big-endian) → [`EventRecord`]: the change log that watch catch-up and
//! compaction walk in revision order.

use serde::{Deserialize, Serialize};

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;
const PAST_KEY: u8 = 0x02;

fn escape_into(out: &mut Vec<u8>, user_key: &[u8]) {
    for &b in user_key {
        out.push(b);
        if b == ESCAPE {
            out.push(ESCAPED_ZERO);
        }
    }
}

/// The encoded prefix that sorts before every version of `user_key` and after every smaller key.
pub fn seek_key(user_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 2);
    escape_into(&mut out, user_key);
    out
}

/// The kv-family key of `user_key` at `revision`.
pub fn kv_key(user_key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 10);
    escape_into(&mut out, user_key);
    out.push(ESCAPE);
    out.push(TERMINATOR);
    out.extend_from_slice(&(!(revision as u64)).to_be_bytes());
    out
}

/// A key that sorts after every version of `user_key` and before every larger user key.
pub fn past_key(user_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 2);
    escape_into(&mut out, user_key);
    out.push(ESCAPE);
    out.push(PAST_KEY);
    out
}

/// Whether `encoded` is a whole kv-family key: escaped user key, terminator, revision.
pub fn is_kv_key(encoded: &[u8]) -> bool {
    let n = encoded.len();
    n >= 10 && encoded[n - 10] == ESCAPE && encoded[n - 9] == TERMINATOR
}

/// The part of a kv-family key every version of its user key shares: all but the revision.
/// The family's prefix filters are built on it, so looking up a key that was never written
/// skips the memtable and the files without a seek (see `Mvcc::get_record`).
pub fn kv_key_prefix(encoded: &[u8]) -> &[u8] {
    &encoded[..encoded.len().saturating_sub(8)]
}

/// Splits a kv-family key into the user key and the revision.
pub fn decode_kv_key(encoded: &[u8]) -> Option<(Vec<u8>, i64)> {
    let mut user_key = Vec::with_capacity(encoded.len().saturating_sub(10));
    let mut i = 0;
    while i < encoded.len() {
        let b = encoded[i];
        if b == ESCAPE {
            match encoded.get(i + 1)? {
                &ESCAPED_ZERO => {
                    user_key.push(0);
                    i += 2;
                }
                &TERMINATOR => {
                    let rev: [u8; 8] = encoded.get(i + 2..i + 10)?.try_into().ok()?;
                    return Some((user_key, !u64::from_be_bytes(rev) as i64));
                }
                _ => return None,
            }
        } else {
            user_key.push(b);
            i += 1;
        }
    }
    None
}

/// The rev-family key of the `sub`-th change made at `revision`.
pub fn rev_key(revision: i64, sub: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(revision as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

pub fn decode_rev_key(encoded: &[u8]) -> Option<(i64, u32)> {
    let rev: [u8; 8] = encoded.get(..8)?.try_into().ok()?;
    let sub: [u8; 4] = encoded.get(8..12)?.try_into().ok()?;
    Some((u64::from_be_bytes(rev) as i64, u32::from_be_bytes(sub)))
}

/// One version of a key. `version == 0` marks a tombstone, as etcd reports deleted keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRecord {
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl KvRecord {
    pub fn is_tombstone(&self) -> bool {
        self.version == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change in the rev family; the value lives in the kv family at (key, revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub kind: EventKind,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

/// A lease as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub ttl: i64,
}

pub const META_APPLIED: &[u8] = b"applied";
pub const META_APPLIED_PARTIAL: &[u8] = b"applied_partial";
pub const META_MEMBERSHIP: &[u8] = b"membership";
pub const META_REVISION: &[u8] = b"revision";
pub const META_COMPACT: &[u8] = b"compact";
pub const META_COMPACT_DONE: &[u8] = b"compact_done";
pub const META_LEASE_PREFIX: &[u8] = b"lease/";
pub const META_LEASE_KEY_PREFIX: &[u8] = b"lkey/";
pub const META_MEMBER_PREFIX: &[u8] = b"member/";
/// `alarm/<member id u64 BE><alarm type i32 BE>` → empty: a raised alarm.
pub const META_ALARM_PREFIX: &[u8] = b"alarm/";
/// The auth state (users, roles, permissions, whether auth is on).
pub const META_AUTH: &[u8] = b"auth";
/// `lckp/<id>` → remaining TTL (i64 BE) checkpointed by a leader; absent: full TTL.
pub const META_LEASE_CHECKPOINT_PREFIX: &[u8] = b"lckp/";

pub fn lease_meta_key(id: i64) -> Vec<u8> {
    let mut k = META_LEASE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = META_ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

pub fn lease_checkpoint_key(id: i64) -> Vec<u8> {
    let mut k = META_LEASE_CHECKPOINT_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn lease_key_prefix(id: i64) -> Vec<u8> {
    let mut k = META_LEASE_KEY_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn lease_key_meta_key(id: i64, user_key: &[u8]) -> Vec<u8> {
    let mut k = lease_key_prefix(id);
    k.extend_from_slice(user_key);
    k
}

pub fn member_meta_key(id: u64) -> Vec<u8> {
    let mut k = META_MEMBER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The smallest byte string greater than every string starting with `prefix` (None: no bound).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// User keys in byte order, around the escape byte and the terminator.
    const SAMPLE_KEYS: &[&[u8]] = &[
        b"",
        b"\x00",
        b"\x00\x00",
        b"\x00\x01",
        b"a",
        b"a\x00",
        b"a\x00\x01",
        b"a\x00b",
        b"ab",
        b"b",
        b"\xff",
        b"\xff\xff",
    ];

    #[test]
    fn encoded_order_is_user_key_then_newest_revision() {
        let keys = SAMPLE_KEYS;
        let mut encoded = Vec::new();
        for k in keys {
            for rev in [9i64, 3, 1] {
                encoded.push((kv_key(k, rev), k.to_vec(), rev));
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            sorted, encoded,
            "byte order of encodings must follow (key asc, revision desc)"
        );
        for (enc, key, rev) in &encoded {
            assert_eq!(decode_kv_key(enc), Some((key.clone(), *rev)));
            assert!(seek_key(key) <= *enc);
            assert!(past_key(key) > *enc);
        }
        for pair in keys.windows(2) {
            assert!(past_key(pair[0]) < kv_key(pair[1], i64::MAX));
            assert!(past_key(pair[0]) < seek_key(pair[1]));
        }
    }

    #[test]
    fn a_key_prefix_is_shared_by_its_versions_only_and_groups_them() {
        let keys = SAMPLE_KEYS;
        let mut all = Vec::new();
        for k in keys {
            for rev in [1i64, 7, i64::MAX] {
                let enc = kv_key(k, rev);
                assert!(is_kv_key(&enc));
                assert_eq!(kv_key_prefix(&enc), kv_key_prefix(&kv_key(k, 2)));
                all.push((enc, k.to_vec()));
            }
        }
        for (a, ka) in &all {
            for (b, kb) in &all {
                assert_eq!(kv_key_prefix(a) == kv_key_prefix(b), ka == kb);
            }
        }
        // Versions sharing a prefix sit together in byte order (what prefix filters need).
        all.sort();
        let prefixes: Vec<&[u8]> = all.iter().map(|(e, _)| kv_key_prefix(e)).collect();
        let mut runs = prefixes.clone();
        runs.dedup();
        assert_eq!(runs.len(), keys.len());
        assert!(!is_kv_key(b"k1"));
        assert!(!is_kv_key(&seek_key(b"abcdefghijkl")));
    }

    #[test]
    fn rev_keys_sort_by_revision_then_sub() {
        assert!(rev_key(2, 9) < rev_key(3, 0));
        assert!(rev_key(300, 1) < rev_key(300, 2));
        assert_eq!(decode_rev_key(&rev_key(77, 5)), Some((77, 5)));
    }

    #[test]
    fn prefix_end_matches_etcdctl() {
        assert_eq!(prefix_end(b"foo"), Some(b"fop".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
