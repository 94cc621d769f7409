//! The node's sled database: its trees, key layout and value codec.
//!
//! One sled database per node, one tree per kind of data (ARCHITECTURE.md,
//! "Storage"), and beside it the journal's segment files (`journal/`,
//! [`crate::wal`]) and the idempotency index's run files (`seen/`,
//! [`crate::seen`]):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `journal` | batch sequence number, big-endian `u64`, then part number, big-endian `u16` | written by nodes before the segment files: the entries of one group commit, in parts of about 7 KiB; read at start-up and deleted once a checkpoint covers them |
//! | `snapshots` | entity key `tenant/kind/id` | the entity's state and the entity sequence it covers |
//! | `seen_runs` | run id, big-endian `u64` | the description of one run of the idempotency index, whose records (`tenant/scope/id` → fingerprint and first answer of an idempotent request) are in the file `seen/<id>.run` ([`crate::seen`]) |
//! | `outbox` | `tenant/message id` | a cross-entity message not yet acknowledged |
//! | `audit` | `tenant/kind/game/draw id` | a draw or hit, as JSON, with what re-checks it |
//! | `defs` | `tenant/...` | tenants, stores, keys and game definitions |
//! | `meta` | name | node-wide facts (journal checkpoint, last batch indexed, bootstrap) |
//!
//! Ids never contain `/` ([`bazaar_games::ids`]), so `/` separates key parts
//! without escaping, and a tenant's data can be listed by its prefix.
//!
//! Every value starts with a format version byte ([`encode`]): a newer node
//! reads older values, and an older node refuses newer ones with a clear
//! error instead of misreading them.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The value format this build writes: bincode with variable-length
/// integers (lengths, counts, enum tags and numbers take the bytes their
/// value needs: a journal entry's lengths and small numbers had been eight
/// bytes each, most of them zeros).
pub const FORMAT_VERSION: u8 = 2;

/// The format before it: bincode with fixed-width integers. Always read;
/// still written where a fixed layout is relied on (the header of an
/// idempotency record, see `actor::seen_value`) or where bytes must not
/// change between builds (the fingerprints of [`hash_encoded`]).
pub const FIXED_WIDTH_VERSION: u8 = 1;

/// bincode's options for [`FORMAT_VERSION`]. Trailing bytes are allowed, as
/// `bincode::deserialize` allows them for [`FIXED_WIDTH_VERSION`]: a value
/// may be read by its first fields only (`outbox::kind_of_record`).
fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_varint_encoding().with_little_endian().allow_trailing_bytes()
}

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
    // Encoded into a buffer the thread keeps, then copied once into a Vec
    // of its size: sizing the value first (bincode's `serialized_size`)
    // walked it a second time, two fifths of an encode's work.
    with_buffer(|bytes| {
        encode_into(bytes, value);
        bytes.to_vec()
    })
}

/// Bytes held in several places at once without a copy each (an
/// idempotency record: in its journal entry, among the pending records,
/// then in the memtable).
pub type SharedBytes = Arc<[u8]>;

/// What [`encode`] makes of `value`, as [`SharedBytes`]: encoded into a
/// buffer the thread keeps, then copied once into its shared allocation
/// (one allocation, where encoding into a `Vec` and converting it took
/// two).
pub fn encode_shared<T: Serialize + ?Sized>(value: &T) -> SharedBytes {
    with_buffer(|bytes| {
        encode_into(bytes, value);
        SharedBytes::from(&bytes[..])
    })
}

/// Runs `use_it` on an empty buffer the thread keeps (a rare large one is
/// not kept).
pub fn with_buffer<R>(use_it: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|buffer| {
        // Asked again while in use (a value whose encoding encodes
        // another): a buffer of its own.
        let Ok(mut bytes) = buffer.try_borrow_mut() else {
            return use_it(&mut Vec::new());
        };
        bytes.clear();
        let result = use_it(&mut bytes);
        if 64 * 1024 < bytes.capacity() {
            *bytes = Vec::new();
        }
        result
    })
}

/// Appends what [`encode`] makes of `value` to `buffer` (the journal
/// encodes a batch straight into the buffer its segment is written from).
pub fn encode_into<T: Serialize + ?Sized>(buffer: &mut Vec<u8>, value: &T) {
    // Not sized first: the journal keeps its buffer, with the capacity of
    // the batches before, so it seldom grows.
    use bincode::Options;
    buffer.push(FORMAT_VERSION);
    options().serialize_into(buffer, value).expect("bincode serialises every type stored by Bazaar into a Vec");
}

/// The xxh3 hash of `value` encoded in [`FIXED_WIDTH_VERSION`]'s form
/// (fingerprints of requests and messages, one per event), into a buffer the thread
/// keeps: no allocation, and the one-shot hash. `cargo bench -p
/// bazaar-node --bench codec -- fingerprint`: 25 ns for a score's payload
/// against 37 ns encoding into a new buffer. (xxh3's streaming hasher fed
/// by bincode's small writes was slower than either.)
///
/// That form, whatever this build writes: an idempotency record keeps the
/// fingerprint of its request, and a retry reaching a node of a newer
/// build must still match it.
pub fn hash_encoded<T: Serialize + ?Sized>(value: &T) -> u64 {
    with_buffer(|bytes| {
        bytes.push(FIXED_WIDTH_VERSION);
        bincode::serialize_into(&mut *bytes, value).expect("bincode serialises every type stored by Bazaar into a Vec");
        xxhash_rust::xxh3::xxh3_64(bytes)
    })
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

    /// The same for at most one pair of shared byte strings (an
    /// idempotency record, which the journal entry, the pending records and
    /// the memtable hold at once).
    pub mod shared_option {
        use crate::storage::SharedBytes;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};
        use serde_bytes::{ByteBuf, Bytes};

        pub fn serialize<S: Serializer>(
            pair: &Option<(SharedBytes, SharedBytes)>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            pair.as_ref().map(|(key, value)| (Bytes::new(key), Bytes::new(value))).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<(SharedBytes, SharedBytes)>, D::Error> {
            let pair = Option::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
            Ok(pair.map(|(key, value)| (key.into_vec().into(), value.into_vec().into())))
        }
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
/// A value may borrow from `bytes` (the `seen` index's blocks do).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> StorageResult<T> {
    use bincode::Options;
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => options().deserialize(rest).map_err(|e| StorageError::Codec(e.to_string())),
        Some((&FIXED_WIDTH_VERSION, rest)) => {
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
    /// The idempotency index (see [`crate::seen`]).
    pub seen: crate::seen::SeenIndex,
    pub outbox: sled::Tree,
    pub audit: sled::Tree,
    pub defs: sled::Tree,
    pub meta: sled::Tree,
    /// Where the journal's segment files are ([`crate::wal`]).
    pub journal_dir: PathBuf,
    files: Arc<Files>,
}

/// sled's files, for what its flush leaves undone (see [`Store::flush`]).
struct Files {
    /// sled's log.
    log: File,
    /// Where sled writes log records too large for a segment.
    blobs: PathBuf,
    blob_sync: parking_lot::Mutex<BlobSync>,
}

/// How a flush learns which blob files sled wrote since the last one.
enum BlobSync {
    /// An inotify watch on the blobs directory names them: a flush reads
    /// the events and syncs those files, and the directory if files were
    /// created. Listing the directory at every flush instead cost more
    /// than half of the journal writer's CPU under unary load: sled keeps
    /// hundreds of live blobs (its consolidated journal pages), and every
    /// one was listed and looked up at every flush.
    Watched {
        inotify: OwnedFd,
        buffer: Vec<MaybeUninit<u8>>,
        /// Files the last flush synced, and whether it had to list the
        /// directory (the kernel dropped events): what tests look at.
        #[cfg_attr(not(test), allow(dead_code))]
        last: Vec<OsString>,
        #[cfg_attr(not(test), allow(dead_code))]
        listed: bool,
        /// Set while a flush syncs what it read: if it fails, the events
        /// are gone, so the next flush syncs every file.
        unfinished: bool,
    },
    /// No inotify instance to be had (the per-user limit reached): the
    /// directory is listed at every flush. Blob files already synced map to
    /// their length then, and whether a later flush found it unchanged.
    /// sled's flusher thread may be writing one (a page its garbage
    /// collection rewrote) while a flush lists the directory, so each is
    /// looked at once more, and synced again if it grew.
    Listed { synced: HashMap<OsString, (u64, bool)> },
}

/// What a flush read from the inotify watch.
struct Events {
    /// Files written (or created) since the last flush.
    written: Vec<OsString>,
    /// Whether any was created: the directory is synced too.
    created: bool,
    /// Whether the kernel dropped events: every file is synced.
    lost: bool,
    /// Whether the watch ended: the directory is listed from now on.
    unwatched: bool,
}

fn failed(path: &Path, error: std::io::Error) -> StorageError {
    StorageError::Sync(path.display().to_string(), error)
}

/// Syncs the file `name` in `dir`; the length it had before (every byte
/// up to it is durable; a writer may have added more meanwhile), or
/// `None` if sled has collected it.
fn sync_file(dir: &Path, name: &std::ffi::OsStr) -> StorageResult<Option<u64>> {
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(&path, e)),
    };
    let length = file.metadata().map_err(|e| failed(&path, e))?.len();
    file.sync_data().map_err(|e| failed(&path, e))?;
    Ok(Some(length))
}

/// How a large file goes once nothing needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// One `unlink`: when no commit waits (at start-up, at a stop).
    AtOnce,
    /// Cut down [`GIVE_BACK_STEP_BYTES`] at a time, each cut synced,
    /// [`GIVE_BACK_PAUSE`] apart, then unlinked: while the node serves.
    Spread,
}

/// [`Pace::Spread`]'s slice of a file, and its pause after each.
///
/// Deleting a file frees its blocks in the file system's next journal
/// commit; on ext4 mounted with `discard` (this machine's) that commit
/// also discards them, and every sync waits behind it. Freeing a
/// checkpoint's eight 64-MiB journal segments at once made the second
/// each checkpoint ended in the slowest of an open loop at 28,000
/// events/s (p99 22-80 ms where most others had 4-8; docs/performance.md).
/// Cut and synced a slice at a time, each commit frees 2 MiB and the
/// discards run at about 150 MB/s: a segment goes in about half a second,
/// and the seconds with discards had a p99 of 5-20 ms (8-MiB slices:
/// 5-40 ms).
pub const GIVE_BACK_STEP_BYTES: u64 = 2 << 20;
pub const GIVE_BACK_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Deletes the file at `path` at `pace`, the rest of it at once as soon
/// as `hurry` says so (a stop is waiting); whether there was one.
pub(crate) fn remove_file(path: &Path, pace: Pace, hurry: &dyn Fn() -> bool) -> StorageResult<bool> {
    let gone = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Ok(false),
        _ => Err(failed(path, e)),
    };
    if pace == Pace::Spread {
        let file = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            Err(e) => return gone(e),
        };
        let mut length = file.metadata().map_err(|e| failed(path, e))?.len();
        while 0 < length && !hurry() {
            length = length.saturating_sub(GIVE_BACK_STEP_BYTES);
            file.set_len(length).and_then(|()| file.sync_data()).map_err(|e| failed(path, e))?;
            std::thread::sleep(GIVE_BACK_PAUSE);
        }
    }
    std::fs::remove_file(path).map(|()| true).or_else(gone)
}

pub(crate) fn sync_dir(dir: &Path) -> StorageResult<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| failed(dir, e))
}

/// The names in `dir`.
fn list(dir: &Path) -> StorageResult<Vec<OsString>> {
    match std::fs::read_dir(dir) {
        Ok(listing) => listing.map(|entry| entry.map(|e| e.file_name()).map_err(|e| failed(dir, e))).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(failed(dir, e)),
    }
}

impl Files {
    fn open(dir: &Path) -> StorageResult<Self> {
        let log = dir.join("db");
        let file = File::open(&log).map_err(|e| failed(&log, e))?;
        let blobs = dir.join("blobs");
        // sled creates it at open; made sure of, since it is watched.
        std::fs::create_dir_all(&blobs).map_err(|e| failed(&blobs, e))?;
        // The entries sled created (`db`, `conf`, `blobs`) are durable too.
        sync_dir(dir)?;
        let blob_sync = match Self::watch(&blobs) {
            Ok(inotify) => {
                // Blobs written before the watch began (sled's recovery
                // writes some) are synced now.
                let last = list(&blobs)?;
                for name in &last {
                    sync_file(&blobs, name)?;
                }
                sync_dir(&blobs)?;
                BlobSync::Watched {
                    inotify,
                    buffer: vec![MaybeUninit::uninit(); 64 << 10],
                    last,
                    listed: true,
                    unfinished: false,
                }
            }
            Err(error) => {
                tracing::warn!(%error, "no inotify watch on sled's blob directory; every flush lists it instead");
                BlobSync::Listed { synced: HashMap::new() }
            }
        };
        Ok(Self { log: file, blobs, blob_sync: parking_lot::Mutex::new(blob_sync) })
    }

    fn watch(blobs: &Path) -> std::io::Result<OwnedFd> {
        use rustix::fs::inotify::{self, WatchFlags};
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            blobs,
            WatchFlags::CREATE | WatchFlags::MODIFY | WatchFlags::CLOSE_WRITE | WatchFlags::MOVED_TO,
        )?;
        Ok(fd)
    }

    /// Syncs the blob files written since the last call, then the log.
    fn sync(&self) -> StorageResult<()> {
        let mut blob_sync = self.blob_sync.lock();
        match &mut *blob_sync {
            BlobSync::Watched { inotify, buffer, last, listed, unfinished } => {
                let Events { written, created, lost, unwatched } =
                    Self::written(inotify, buffer).map_err(|e| failed(&self.blobs, e))?;
                last.clear();
                // The kernel dropped events (its queue overflowed), or the
                // last flush failed after reading them: every file is
                // synced, as at open.
                let lost = lost || *unfinished;
                *listed = lost;
                *unfinished = true;
                let names = if lost { list(&self.blobs)? } else { written };
                for name in names {
                    if sync_file(&self.blobs, &name)?.is_some() {
                        last.push(name);
                    }
                }
                if created || lost {
                    sync_dir(&self.blobs)?;
                }
                *unfinished = false;
                if unwatched {
                    tracing::warn!(
                        "the inotify watch on sled's blob directory ended; every flush lists it from now on"
                    );
                    *blob_sync = BlobSync::Listed { synced: HashMap::new() };
                }
            }
            BlobSync::Listed { synced } => self.sync_listed(synced)?,
        }
        drop(blob_sync);
        self.log.sync_data().map_err(|e| failed(Path::new("the sled log"), e))
    }

    /// Reads every pending inotify event.
    fn written(inotify: &OwnedFd, buffer: &mut [MaybeUninit<u8>]) -> std::io::Result<Events> {
        use rustix::fs::inotify::{ReadFlags, Reader};
        use std::os::unix::ffi::OsStrExt;
        let mut names = std::collections::HashSet::new();
        let (mut created, mut lost, mut unwatched) = (false, false, false);
        let mut reader = Reader::new(inotify, buffer);
        loop {
            let event = match reader.next() {
                Ok(event) => event,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(errno) => return Err(errno.into()),
            };
            let flags = event.events();
            lost |= flags.contains(ReadFlags::QUEUE_OVERFLOW);
            // The watch ended (the directory went, or its file system).
            unwatched |= flags.intersects(ReadFlags::IGNORED | ReadFlags::UNMOUNT);
            created |= flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO);
            if let Some(name) = event.file_name() {
                names.insert(std::ffi::OsStr::from_bytes(name.to_bytes()).to_owned());
            }
        }
        Ok(Events { written: names.into_iter().collect(), created, lost: lost || unwatched, unwatched })
    }

    fn sync_listed(&self, synced: &mut HashMap<OsString, (u64, bool)>) -> StorageResult<()> {
        let mut present = HashMap::new();
        let mut added = false;
        for name in list(&self.blobs)? {
            let known = synced.get(&name).copied();
            if let Some((length, true)) = known {
                present.insert(name, (length, true));
                continue;
            }
            let path = self.blobs.join(&name);
            let length = match std::fs::metadata(&path) {
                Ok(metadata) => metadata.len(),
                // Collected by sled since it was listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed(&path, e)),
            };
            let unchanged = known.is_some_and(|(synced_length, _)| synced_length == length);
            if !unchanged {
                match sync_file(&self.blobs, &name)? {
                    Some(length) => present.insert(name, (length, false)),
                    None => continue,
                };
                added = true;
            } else {
                present.insert(name, (length, true));
            }
        }
        if added {
            sync_dir(&self.blobs)?;
        }
        *synced = present;
        Ok(())
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
        let files = Arc::new(Files::open(dir)?);
        let flush: crate::seen::Flush = {
            let (db, files) = (db.clone(), files.clone());
            Arc::new(move || {
                db.flush()?;
                files.sync()
            })
        };
        Ok(Self {
            journal: db.open_tree("journal")?,
            snapshots: db.open_tree("snapshots")?,
            seen: crate::seen::SeenIndex::open(&db, &dir.join("seen"), flush)?,
            outbox: db.open_tree("outbox")?,
            audit: db.open_tree("audit")?,
            defs: db.open_tree("defs")?,
            meta: db.open_tree("meta")?,
            journal_dir: dir.join("journal"),
            files,
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

/// [`key`] as [`SharedBytes`], built in the thread's buffer and copied
/// once into its shared allocation (an idempotency record's key, made for
/// every event).
pub fn shared_key(parts: &[&str]) -> SharedBytes {
    with_buffer(|bytes| {
        for (at, part) in parts.iter().enumerate() {
            if 0 < at {
                bytes.push(b'/');
            }
            bytes.extend_from_slice(part.as_bytes());
        }
        SharedBytes::from(&bytes[..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_removed_spread_out_is_cut_a_slice_at_a_time_until_told_to_hurry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("segment");
        // Sparse: ten slices long without writing them.
        File::create(&path).and_then(|f| f.set_len(10 * GIVE_BACK_STEP_BYTES)).expect("file");
        let asked = std::cell::Cell::new(0);
        let hurry = || {
            asked.set(asked.get() + 1);
            // Two cuts, then a stop waits.
            asked.get() == 3
        };
        assert!(remove_file(&path, Pace::Spread, &hurry).expect("removed"));
        assert!(!path.exists());
        assert_eq!(asked.get(), 3, "asked before each cut, and not after it was told");
        assert!(!remove_file(&path, Pace::Spread, &|| false).expect("nothing to remove"), "no file, no error");
        File::create(&path).and_then(|f| f.set_len(10 * GIVE_BACK_STEP_BYTES)).expect("file");
        let never = || -> bool { unreachable!("an immediate removal cuts nothing") };
        assert!(remove_file(&path, Pace::AtOnce, &never).expect("removed"));
        assert!(!path.exists());
    }

    #[test]
    fn a_shared_key_is_the_key() {
        for parts in [&["t", "event", "e-1"][..], &["only"], &[]] {
            assert_eq!(shared_key(parts)[..], key(parts)[..], "{parts:?}");
        }
    }

    #[test]
    fn a_fingerprint_is_the_hash_of_the_fixed_width_encoding_whatever_this_build_writes() {
        for value in [(0u64, String::new()), (42, "x".to_owned()), (u64::MAX, "y".repeat(1_000))] {
            let mut fixed_width = vec![FIXED_WIDTH_VERSION];
            fixed_width.extend(bincode::serialize(&value).expect("serialises"));
            assert_eq!(hash_encoded(&value), xxhash_rust::xxh3::xxh3_64(&fixed_width));
        }
        // Pinned: a retry reaching a newer build must match the fingerprint
        // its first answer's record keeps. Never update to make this pass.
        assert_eq!(hash_encoded(&(42u64, "x".to_owned())), 0xcac9_50a0_d185_b287);
    }

    #[test]
    fn values_of_the_fixed_width_format_are_still_read() {
        let mut fixed_width = vec![FIXED_WIDTH_VERSION];
        fixed_width.extend(bincode::serialize(&(42u64, -7i64, "x".to_owned(), vec![1u32, 2])).expect("serialises"));
        assert_eq!(
            decode::<(u64, i64, String, Vec<u32>)>(&fixed_width).expect("read"),
            (42, -7, "x".to_owned(), vec![1, 2])
        );
        // The current format of the same value is shorter: 1 + 1 + 1 + 2 +
        // 1 + 2 bytes against 1 + 8 + 8 + 9 + 8 + 8.
        let current = encode(&(42u64, -7i64, "x".to_owned(), vec![1u32, 2]));
        assert_eq!((current.len(), fixed_width.len()), (8, 42));
        assert_eq!(
            decode::<(u64, i64, String, Vec<u32>)>(&current).expect("read"),
            (42, -7, "x".to_owned(), vec![1, 2])
        );
    }

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

    type Names = std::collections::HashSet<OsString>;

    fn names(dir: &Path) -> Names {
        list(dir).expect("list").into_iter().collect()
    }

    /// What the last flush synced, and whether it listed the directory.
    fn last_synced(store: &Store) -> (Names, bool) {
        match &*store.files.blob_sync.lock() {
            BlobSync::Watched { last, listed, .. } => (last.iter().cloned().collect(), *listed),
            BlobSync::Listed { .. } => panic!("this machine has inotify"),
        }
    }

    #[test]
    fn a_flush_syncs_the_blob_files_written_since_the_last_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let blobs = dir.path().join("blobs");
        store.flush().expect("flush");
        let mut earlier = Names::new();
        for round in 1..=2u64 {
            let before = names(&blobs);
            store.journal.insert(round.to_be_bytes(), vec![7u8; 300_000]).expect("insert");
            let new: Names = names(&blobs).difference(&before).cloned().collect();
            assert!(!new.is_empty(), "sled writes a 300 kB value to a blob file of its own");
            store.flush().expect("flush");
            let (synced, listed) = last_synced(&store);
            assert!(!listed, "the kernel named the files; nothing was listed");
            assert!(new.is_subset(&synced), "{new:?} synced: {synced:?}");
            assert!(synced.is_disjoint(&earlier), "files synced before and unchanged since are left alone");
            earlier.extend(new);
        }

        // A file written again after a flush synced it (one sled's flusher
        // was still writing) is synced again, then left alone.
        let growing = blobs.join("9223372036854775000");
        let name = growing.file_name().expect("name").to_owned();
        std::fs::write(&growing, [1u8; 10]).expect("write");
        store.flush().expect("flush");
        assert!(last_synced(&store).0.contains(&name));
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &[2u8]))
                .expect("append")
        };
        append(&growing);
        store.flush().expect("flush");
        assert!(last_synced(&store).0.contains(&name), "synced again");
        store.flush().expect("flush");
        assert!(!last_synced(&store).0.contains(&name), "then left alone");

        // Events the kernel dropped (more than its queue holds between two
        // flushes): every file is listed and synced.
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(16_384);
        let other = blobs.join("9223372036854775001");
        std::fs::write(&other, [1u8]).expect("write");
        // Alternating files: the kernel merges only identical events in a row.
        for _ in 0..queue / 2 + 10 {
            append(&growing);
            append(&other);
        }
        store.flush().expect("flush");
        let (synced, listed) = last_synced(&store);
        assert!(listed, "the queue overflowed");
        assert!(names(&blobs).is_subset(&synced), "every file synced");
        store.flush().expect("flush");
        let (synced, listed) = last_synced(&store);
        assert!(!listed && !synced.contains(&name), "and watched again: {synced:?}");
        // A flush that failed after reading the events leaves the next one
        // to sync every file.
        if let BlobSync::Watched { unfinished, .. } = &mut *store.files.blob_sync.lock() {
            *unfinished = true;
        }
        store.flush().expect("flush");
        let (synced, listed) = last_synced(&store);
        assert!(listed && synced.contains(&name), "{synced:?}");
        std::fs::remove_file(&growing).expect("remove");
        std::fs::remove_file(&other).expect("remove");
    }

    #[test]
    fn without_inotify_a_flush_lists_the_blobs_and_syncs_the_new_and_grown_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        *store.files.blob_sync.lock() = BlobSync::Listed { synced: HashMap::new() };
        let blobs = dir.path().join("blobs");
        let synced = |name: &OsString| match &*store.files.blob_sync.lock() {
            BlobSync::Listed { synced } => synced.get(name).copied(),
            BlobSync::Watched { .. } => None,
        };
        // Every blob present before a flush is synced by it, at its length
        // (sled's flusher may add or collect others meanwhile).
        let synced_all = |before: &Names| {
            for name in before {
                let length = std::fs::metadata(blobs.join(name)).map(|m| m.len());
                if let Ok(length) = length {
                    assert!(synced(name).is_some_and(|(l, _)| length <= l), "{name:?} synced");
                }
            }
        };
        for round in 1..=2u64 {
            store.journal.insert(round.to_be_bytes(), vec![7u8; 300_000]).expect("insert");
            let present = names(&blobs);
            assert!(!present.is_empty(), "sled writes a 300 kB value to a blob file of its own");
            store.flush().expect("flush");
            synced_all(&present);
        }
        // A blob that grows after a flush synced it (one sled's flusher was
        // still writing) is synced again at its new length.
        let growing = blobs.join("9223372036854775000");
        std::fs::write(&growing, [1u8; 10]).expect("write");
        store.flush().expect("flush");
        synced_all(&names(&blobs));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&growing)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[2u8; 90]))
            .expect("append");
        store.flush().expect("flush");
        let name = growing.file_name().expect("name").to_owned();
        assert_eq!(synced(&name), Some((100, false)), "synced again");
        store.flush().expect("flush");
        assert_eq!(synced(&name), Some((100, true)), "then left alone");
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
