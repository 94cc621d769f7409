//! The node's sled database: its trees, key layout and value codec.
//!
//! One sled database per node, one tree per kind of data (ARCHITECTURE.md,
//! "Storage"):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `journal` | batch sequence number, big-endian `u64` | every entry of one group commit |
//! | `snapshots` | entity key `tenant/kind/id` | the entity's state and the entity sequence it covers |
//! | `seen` | `tenant/scope/id` | fingerprint and first answer of an idempotent request |
//! | `outbox` | `tenant/message id` | a cross-entity message not yet acknowledged |
//! | `audit` | `tenant/kind/game/draw id` | a draw or hit, as JSON, with what re-checks it |
//! | `defs` | `tenant/...` | tenants, stores, keys and game definitions |
//! | `meta` | name | node-wide facts (journal checkpoint, bootstrap) |
//!
//! Ids never contain `/` ([`bazaar_games::ids`]), so `/` separates key parts
//! without escaping, and a tenant's data can be listed by its prefix.
//!
//! Every value starts with a format version byte ([`encode`]): a newer node
//! reads older values, and an older node refuses newer ones with a clear
//! error instead of misreading them.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The value format this build writes.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value could not be decoded: {0}")]
    Codec(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("syncing {0}: {1}")]
    Sync(String, std::io::Error),
}

pub type StorageResult<T> = Result<T, StorageError>;

/// Serialises `value` as a version byte followed by bincode.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Sized first: a journal batch is hundreds of kilobytes, and growing
    // the buffer by doubling copied it about twice over.
    let size = bincode::serialized_size(value).map_or(64, |size| usize::try_from(size).unwrap_or(64));
    let mut bytes = Vec::with_capacity(1 + size);
    bytes.push(FORMAT_VERSION);
    bincode::serialize_into(&mut bytes, value).expect("bincode serialises every type stored by Bazaar into a Vec");
    bytes
}

/// Byte strings as bincode bytes (a length, then a copy) rather than a
/// sequence of `u8`s serialised one by one: the same bytes on disk, read
/// and written many times faster. For `#[serde(with = "...")]`.
pub mod byte_pairs {
    use crate::journal::KeyValue;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(pairs: &[KeyValue], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(pairs.iter().map(|(key, value)| (Bytes::new(key), Bytes::new(value))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<KeyValue>, D::Error> {
        let pairs = Vec::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
        Ok(pairs.into_iter().map(|(key, value)| (key.into_vec(), value.into_vec())).collect())
    }

    /// The same for at most one pair.
    pub mod option {
        use crate::journal::KeyValue;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};
        use serde_bytes::{ByteBuf, Bytes};

        pub fn serialize<S: Serializer>(pair: &Option<KeyValue>, serializer: S) -> Result<S::Ok, S::Error> {
            pair.as_ref().map(|(key, value)| (Bytes::new(key), Bytes::new(value))).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<KeyValue>, D::Error> {
            let pair = Option::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
            Ok(pair.map(|(key, value)| (key.into_vec(), value.into_vec())))
        }
    }
}

/// Reads a value written by [`encode`] of this or an older format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StorageResult<T> {
    match bytes.split_first() {
        Some((&version, rest)) if version == FORMAT_VERSION => {
            bincode::deserialize(rest).map_err(|e| StorageError::Codec(e.to_string()))
        }
        Some((version, _)) => Err(StorageError::Codec(format!(
            "value has format version {version}; this build reads up to {FORMAT_VERSION} (upgrade the node)"
        ))),
        None => Err(StorageError::Codec("empty value".into())),
    }
}

/// The node's database and its trees.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub journal: sled::Tree,
    pub snapshots: sled::Tree,
    pub seen: sled::Tree,
    pub outbox: sled::Tree,
    pub audit: sled::Tree,
    pub defs: sled::Tree,
    pub meta: sled::Tree,
    files: Arc<Files>,
}

/// sled's files, for what its flush leaves undone (see [`Store::flush`]).
struct Files {
    /// sled's log.
    log: File,
    /// Where sled writes log records too large for a segment.
    blobs: PathBuf,
    /// Blob files already synced: their length then, and whether a later
    /// flush found it unchanged. sled's flusher thread may be writing one
    /// (a page its garbage collection rewrote) while a flush lists the
    /// directory, so each is looked at once more, and synced again if it
    /// grew.
    synced: parking_lot::Mutex<HashMap<OsString, (u64, bool)>>,
}

fn failed(path: &Path, error: std::io::Error) -> StorageError {
    StorageError::Sync(path.display().to_string(), error)
}

impl Files {
    fn open(dir: &Path) -> StorageResult<Self> {
        let log = dir.join("db");
        let file = File::open(&log).map_err(|e| failed(&log, e))?;
        // The entries sled created (`db`, `conf`, `blobs`) are durable too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| failed(dir, e))?;
        Ok(Self { log: file, blobs: dir.join("blobs"), synced: parking_lot::Mutex::new(HashMap::new()) })
    }

    /// Syncs the blob files written since the last call (and those synced
    /// lately that grew since), then the log.
    fn sync(&self) -> StorageResult<()> {
        let mut synced = self.synced.lock();
        let mut present = HashMap::new();
        let mut added = false;
        let listing = match std::fs::read_dir(&self.blobs) {
            Ok(listing) => Some(listing),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(failed(&self.blobs, e)),
        };
        for entry in listing.into_iter().flatten() {
            let name = entry.map_err(|e| failed(&self.blobs, e))?.file_name();
            let known = synced.get(&name).copied();
            if let Some((length, true)) = known {
                present.insert(name, (length, true));
                continue;
            }
            let path = self.blobs.join(&name);
            let file = match File::open(&path) {
                Ok(file) => file,
                // Collected by sled since it was listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed(&path, e)),
            };
            let length = file.metadata().map_err(|e| failed(&path, e))?.len();
            let unchanged = known.is_some_and(|(synced_length, _)| synced_length == length);
            if !unchanged {
                file.sync_data().map_err(|e| failed(&path, e))?;
                added = true;
            }
            present.insert(name, (length, unchanged));
        }
        if added {
            File::open(&self.blobs).and_then(|d| d.sync_all()).map_err(|e| failed(&self.blobs, e))?;
        }
        *synced = present;
        drop(synced);
        self.log.sync_data().map_err(|e| failed(Path::new("the sled log"), e))
    }
}

/// sled's page cache unless configured (sled's own default is 1 GiB, a
/// kibibyte per customer at a million active ones, who are in their actors
/// anyway).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> StorageResult<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens the database with `cache_bytes` of page cache.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> StorageResult<Self> {
        let db = sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).cache_capacity(cache_bytes).open()?;
        Ok(Self {
            journal: db.open_tree("journal")?,
            snapshots: db.open_tree("snapshots")?,
            seen: db.open_tree("seen")?,
            outbox: db.open_tree("outbox")?,
            audit: db.open_tree("audit")?,
            defs: db.open_tree("defs")?,
            meta: db.open_tree("meta")?,
            files: Arc::new(Files::open(dir)?),
            db,
        })
    }

    /// Makes every write so far durable, against power loss too. sled
    /// 0.34's flush alone does not: on Linux it waits for
    /// `sync_file_range`, which flushes neither the drive's write cache nor
    /// the file's metadata, and records larger than a quarter segment go to
    /// blob files it never syncs. So the blob files written since the last
    /// flush are synced (and their directory), then the log. What this
    /// cannot close is in ARCHITECTURE.md ("What an acknowledgement
    /// survives").
    pub fn flush(&self) -> StorageResult<()> {
        self.db.flush()?;
        self.files.sync()
    }

    pub async fn flush_async(&self) -> StorageResult<()> {
        self.db.flush_async().await?;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.sync())
            .await
            .map_err(|e| StorageError::Unavailable(format!("syncing the database: {e}")))?
    }
}

/// Joins key parts with `/`.
pub fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("/").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_format_version() {
        let bytes = encode(&(42u64, "x".to_owned()));
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u64, String)>(&bytes).expect("round trip"), (42, "x".to_owned()));
        let mut newer = bytes.clone();
        newer[0] = FORMAT_VERSION + 1;
        let error = decode::<(u64, String)>(&newer).expect_err("newer format refused");
        assert!(error.to_string().contains("upgrade the node"), "{error}");
        assert!(decode::<u64>(&[]).is_err());
    }

    #[test]
    fn a_flush_syncs_the_blob_files_sled_wrote() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let blobs = dir.path().join("blobs");
        let listed = || -> HashMap<OsString, u64> {
            std::fs::read_dir(&blobs)
                .map(|listing| {
                    listing
                        .map(|entry| entry.expect("entry"))
                        .filter_map(|entry| Some((entry.file_name(), entry.metadata().ok()?.len())))
                        .collect()
                })
                .unwrap_or_default()
        };
        // Every blob present before a flush is synced by it, at its length
        // (sled's flusher may add or collect others meanwhile).
        let synced_all = |before: &HashMap<OsString, u64>| {
            let synced = store.files.synced.lock();
            for (name, length) in before {
                if blobs.join(name).exists() {
                    assert!(synced.get(name).is_some_and(|(l, _)| *length <= *l), "{name:?} synced");
                }
            }
        };
        store.journal.insert(1u64.to_be_bytes(), vec![7u8; 300_000]).expect("insert");
        let first = listed();
        assert!(!first.is_empty(), "sled writes a 300 kB value to a blob file of its own");
        store.flush().expect("flush");
        synced_all(&first);
        store.journal.insert(2u64.to_be_bytes(), vec![8u8; 300_000]).expect("insert");
        let second = listed();
        assert!(second.keys().any(|name| !first.contains_key(name)), "another blob: {first:?} then {second:?}");
        store.flush().expect("flush");
        synced_all(&second);

        // A blob that grows after a flush synced it (one sled's flusher was
        // still writing) is synced again at its new length.
        let growing = blobs.join("9223372036854775000");
        std::fs::write(&growing, [1u8; 10]).expect("write");
        store.flush().expect("flush");
        synced_all(&listed());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&growing)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[2u8; 90]))
            .expect("append");
        store.flush().expect("flush");
        let name = growing.file_name().expect("name").to_owned();
        assert_eq!(store.files.synced.lock().get(&name).copied(), Some((100, false)), "synced again");
        store.flush().expect("flush");
        assert_eq!(store.files.synced.lock().get(&name).copied(), Some((100, true)), "then left alone");
        std::fs::remove_file(&growing).expect("remove");
    }

    #[test]
    fn store_survives_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.defs.insert(key(&["t", "tenant"]), encode(&"mall")).expect("insert");
            store.flush().expect("flush");
        }
        // sled's background flusher may hold the directory's lock for a
        // moment after the last handle is dropped; a new process never
        // meets it, a reopen in the same process may.
        let mut reopened = Store::open(dir.path());
        for _ in 0..50 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            reopened = Store::open(dir.path());
        }
        let store = reopened.expect("reopen");
        let value = store.defs.get(key(&["t", "tenant"])).expect("get").expect("present");
        assert_eq!(decode::<String>(&value).expect("decode"), "mall");
    }
}
