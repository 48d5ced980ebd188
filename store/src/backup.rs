//! Backups: the file that `Maintenance.Snapshot` streams, and reading, checking and
//! restoring it (`flotilla store snapshot save | status | restore`).
//!
//! The format is Flotilla's own, not etcd's bbolt file:
//!
//! ```text
//! "FLOTSNAP" | format u32 BE | header length u32 BE | header (bincode `Header`)
//! | record* | 0xFF | zero padding to a multiple of 512 bytes
//! | SHA-256 of every byte before it (32 bytes)
//! record = family tag u8 | key length u32 BE | key | value length u32 BE | value
//! ```
//!
//! The padding and trailer follow etcd's own snapshot stream (a bbolt file is whole pages,
//! then its SHA-256), so etcdctl's `snapshot save` also accepts the stream and writes the same
//! file; only Flotilla's tools read it.
//!
//! The records are the `kv`, `rev` and `meta` families read from one RocksDB snapshot, so a
//! backup is a single consistent point of the state machine. A restore keeps every key,
//! revision, compaction point and lease, and drops what belongs to the old cluster (applied
//! log position, membership, member attributes): the restored members form a new cluster
//! from their flags, as etcdutl's restore does.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context};
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mvcc::keys::{
    META_APPLIED, META_APPLIED_PARTIAL, META_AUTH, META_COMPACT, META_MEMBERSHIP,
    META_MEMBER_PREFIX, META_REVISION,
};
use crate::mvcc::{CF_KV, CF_META, CF_REV};

pub const MAGIC: &[u8; 8] = b"FLOTSNAP";
pub const FORMAT: u32 = 1;
/// Families in a backup; a record's tag is the index here.
pub const FAMILIES: [&str; 3] = [CF_KV, CF_REV, CF_META];
const END: u8 = 0xFF;
const HASH_LEN: usize = 32;
/// Bytes per streamed message (etcd sends 32 KiB).
pub const CHUNK: usize = 64 * 1024;

/// What a backup says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub revision: i64,
    pub compact_revision: i64,
    pub cluster_id: u64,
    pub member_id: u64,
    /// Seconds since the Unix epoch when the backup was taken.
    pub created: u64,
}

/// Writes a backup of `db` (from one snapshot of it) to `out`, in `CHUNK`-sized writes.
/// The header's revision and compaction revision are the snapshot's own. Runs on a blocking
/// thread; returns the bytes written.
pub fn write(db: &DB, header: &Header, out: &mut impl Write) -> anyhow::Result<u64> {
    let snap = db.snapshot();
    let meta = db
        .cf_handle(CF_META)
        .context("column family meta is missing")?;
    let counter = |key: &[u8], default: i64| -> anyhow::Result<i64> {
        Ok(match snap.get_cf(meta, key)? {
            Some(v) => bincode::deserialize(&v).context("a counter in meta")?,
            None => default,
        })
    };
    let header = Header {
        revision: counter(META_REVISION, header.revision)?,
        compact_revision: counter(META_COMPACT, header.compact_revision)?,
        ..header.clone()
    };
    let mut w = HashingWriter {
        inner: out,
        hash: Sha256::new(),
        written: 0,
    };
    let head = bincode::serialize(&header)?;
    w.write_all(MAGIC)?;
    w.write_all(&FORMAT.to_be_bytes())?;
    w.write_all(&(head.len() as u32).to_be_bytes())?;
    w.write_all(&head)?;
    for (tag, name) in FAMILIES.iter().enumerate() {
        let cf = db
            .cf_handle(name)
            .with_context(|| format!("column family {name} is missing"))?;
        let mut it = snap.raw_iterator_cf_opt(cf, crate::mvcc::total_order());
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let stripped;
            let v = if *name == CF_META && k == META_AUTH {
                stripped = crate::auth::strip_token_key(v)?;
                &stripped[..]
            } else {
                v
            };
            crate::raft::state_machine::write_record(&mut w, tag, k, v)?;
            it.next();
        }
        it.status()?;
    }
    w.write_all(&[END])?;
    let padding = (512 - (w.written % 512) as usize) % 512;
    w.write_all(&vec![0u8; padding])?;
    let digest = w.hash.clone().finalize();
    w.inner.write_all(&digest)?;
    w.inner.flush()?;
    Ok(w.written + HASH_LEN as u64)
}

struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Checks a backup file's SHA-256 trailer against its contents.
pub fn verify(path: &Path) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if len < (MAGIC.len() + 8 + 1 + HASH_LEN) as u64 {
        bail!("{} is too short to be a Flotilla snapshot", path.display());
    }
    let body = len - HASH_LEN as u64;
    let mut hash = Sha256::new();
    let mut reader = BufReader::with_capacity(1 << 20, (&mut f).take(body));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let mut stored = [0u8; HASH_LEN];
    f.seek(SeekFrom::Start(body))?;
    f.read_exact(&mut stored)?;
    if hash.finalize().as_slice() != stored {
        bail!(
            "{}: snapshot file integrity check failed (SHA-256 mismatch); the file is damaged or not complete",
            path.display()
        );
    }
    Ok(())
}

/// Reads a verified backup record by record.
pub struct Reader {
    inner: BufReader<File>,
    pub header: Header,
    done: bool,
}

impl Reader {
    /// Opens and verifies `path`.
    pub fn open(path: &Path) -> anyhow::Result<Reader> {
        verify(path)?;
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut inner = BufReader::with_capacity(1 << 20, f);
        let mut magic = [0u8; 8];
        inner.read_exact(&mut magic)?;
        if &magic != MAGIC {
            bail!(
                "{} is not a Flotilla snapshot (an etcd snapshot is a bbolt file; restore it with etcdutl)",
                path.display()
            );
        }
        let format = read_u32(&mut inner)?;
        if format != FORMAT {
            bail!(
                "{}: snapshot format {format} is not supported (this build reads format {FORMAT})",
                path.display()
            );
        }
        let len = read_u32(&mut inner)? as usize;
        let mut head = vec![0u8; len];
        inner.read_exact(&mut head)?;
        let header = bincode::deserialize(&head).context("snapshot header")?;
        Ok(Reader {
            inner,
            header,
            done: false,
        })
    }

    /// The next (family, key, value), or None after the last.
    pub fn next_record(&mut self) -> anyhow::Result<Option<(&'static str, Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.inner.read_exact(&mut tag)?;
        if tag[0] == END {
            self.done = true;
            return Ok(None);
        }
        let family = FAMILIES
            .get(tag[0] as usize)
            .with_context(|| format!("unknown record tag {} in the snapshot", tag[0]))?;
        let key = read_bytes(&mut self.inner)?;
        let value = read_bytes(&mut self.inner)?;
        Ok(Some((family, key, value)))
    }
}

fn read_u32(r: &mut impl Read) -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_bytes(r: &mut impl Read) -> anyhow::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// What `snapshot status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// CRC-32 of every record, a fingerprint to compare backups by.
    pub hash: u32,
    pub revision: i64,
    #[serde(rename = "totalKey")]
    pub total_keys: u64,
    #[serde(rename = "totalSize")]
    pub total_size: u64,
}

pub fn status(path: &Path) -> anyhow::Result<Status> {
    let mut r = Reader::open(path)?;
    let mut hash = crc32fast::Hasher::new();
    let mut total_keys = 0u64;
    while let Some((family, key, value)) = r.next_record()? {
        hash.update(family.as_bytes());
        hash.update(&key);
        hash.update(&value);
        total_keys += 1;
    }
    Ok(Status {
        hash: hash.finalize(),
        revision: r.header.revision,
        total_keys,
        total_size: std::fs::metadata(path)?.len(),
    })
}

/// Metadata of the old cluster that a restore leaves out.
fn belongs_to_old_cluster(family: &str, key: &[u8]) -> bool {
    family == CF_META
        && (key == META_APPLIED
            || key == META_APPLIED_PARTIAL
            || key == META_MEMBERSHIP
            || key.starts_with(META_MEMBER_PREFIX))
}

/// Builds a new member's data dir from a backup. Refuses a data dir that exists, as
/// etcdutl does. Returns the backup's header.
pub fn restore(path: &Path, data_dir: &Path) -> anyhow::Result<Header> {
    if data_dir.exists() {
        bail!("data-dir {:?} exists", data_dir.display().to_string());
    }
    let mut reader = Reader::open(path)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let result = (|| {
        let db = crate::open_db(&data_dir.join("db"))?;
        let mut batch = WriteBatch::default();
        while let Some((family, key, value)) = reader.next_record()? {
            if belongs_to_old_cluster(family, &key) {
                continue;
            }
            let cf = db
                .cf_handle(family)
                .with_context(|| format!("column family {family} is missing"))?;
            batch.put_cf(cf, key, value);
            if batch.size_in_bytes() >= 4 << 20 {
                db.write(std::mem::take(&mut batch))?;
            }
        }
        db.write(batch)?;
        db.flush_wal(true)?;
        for name in FAMILIES {
            if let Some(cf) = db.cf_handle(name) {
                db.flush_cf(cf)?;
            }
        }
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        // Leave nothing half-built behind.
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(e);
    }
    Ok(reader.header)
}

/// Writes a backup file from a stream of chunks, checking it before it takes its name.
pub fn save_chunks(
    path: &Path,
    chunks: impl Iterator<Item = anyhow::Result<Vec<u8>>>,
) -> anyhow::Result<u64> {
    let part = path.with_extension("part");
    let mut out = BufWriter::new(
        File::create(&part).with_context(|| format!("creating {}", part.display()))?,
    );
    let mut total = 0u64;
    for chunk in chunks {
        let chunk = chunk?;
        total += chunk.len() as u64;
        out.write_all(&chunk)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    verify(&part)?;
    std::fs::rename(&part, path)
        .with_context(|| format!("renaming {} to {}", part.display(), path.display()))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_round_trips_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = crate::open_db(&dir.path().join("src")).unwrap_or_else(|e| panic!("{e}"));
        let kv = db.cf_handle(CF_KV).unwrap_or_else(|| panic!("kv"));
        let meta = db.cf_handle(CF_META).unwrap_or_else(|| panic!("meta"));
        db.put_cf(kv, b"k1", b"v1")
            .unwrap_or_else(|e| panic!("{e}"));
        db.put_cf(kv, b"k2", b"v2")
            .unwrap_or_else(|e| panic!("{e}"));
        db.put_cf(meta, META_MEMBERSHIP, b"old cluster")
            .unwrap_or_else(|e| panic!("{e}"));
        let header = Header {
            revision: 2,
            compact_revision: 0,
            cluster_id: 1,
            member_id: 2,
            created: 3,
        };
        let file = dir.path().join("backup.db");
        let mut out = Vec::new();
        write(&db, &header, &mut out).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&file, &out).unwrap_or_else(|e| panic!("{e}"));

        let s = status(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.revision, s.total_keys), (2, 3));

        let target = dir.path().join("restored");
        assert_eq!(
            restore(&file, &target).unwrap_or_else(|e| panic!("{e}")),
            header
        );
        let restored = crate::open_db(&target.join("db")).unwrap_or_else(|e| panic!("{e}"));
        let kv = restored.cf_handle(CF_KV).unwrap_or_else(|| panic!("kv"));
        let meta = restored
            .cf_handle(CF_META)
            .unwrap_or_else(|| panic!("meta"));
        assert_eq!(
            restored.get_cf(kv, b"k2").unwrap_or_else(|e| panic!("{e}")),
            Some(b"v2".to_vec())
        );
        assert_eq!(
            restored
                .get_cf(meta, META_MEMBERSHIP)
                .unwrap_or_else(|e| panic!("{e}")),
            None,
            "the old cluster's membership is not restored"
        );
        drop(restored);
        let again = restore(&file, &target).map(|_| ()).unwrap_err().to_string();
        assert!(again.contains("exists"), "{again}");

        // One flipped byte anywhere is caught.
        let mut damaged = out.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 1;
        std::fs::write(&file, &damaged).unwrap_or_else(|e| panic!("{e}"));
        let err = status(&file).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("integrity check failed"), "{err}");
    }
}
