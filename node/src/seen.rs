//! The idempotency index: every request id a node has applied (event ids,
//! outbox receipts), with the request's fingerprint and its first answer.
//!
//! It is written once per event and read once per new event id, almost
//! always to learn that the id is new. As a sled tree it was the journal
//! writer's largest cost: one random-key insert per event, in a tree that
//! splits a leaf every sixteen inserts. So it is a small log-structured
//! merge index instead:
//!
//! - the **memtable**: a hash map of the records the writer indexed since
//!   the last run was cut. The journal holds them too, so they need not be
//!   durable: recovery indexes them again from the journal tail;
//! - **runs**: immutable files (`seen/<id>.run` beside sled's), records
//!   sorted by key in blocks of about [`BLOCK_BYTES`], ending with the
//!   first key of each block and a binary fuse filter of the keys' hashes
//!   (about 9 bits per record, 0.4 % false positives), both kept in
//!   memory. A block is read only for the ids a filter lets by;
//! - the **summary**: one Bloom filter of the keys of every run (of their
//!   hashes, which each run also stores), so that a lookup of a new id
//!   costs a hash-map probe and one cache line, however many runs there
//!   are; the runs' own filters are probed only for the ids it lets by
//!   (0.4 % of new ones, once it holds the keys it was sized for) and for
//!   runs it does not cover yet. Each run's filter probe is a cache miss
//!   or three, and a node that has served for an hour has a dozen runs
//!   (a few dozen while its compactor lags behind a burst): probing them
//!   all was a tenth of the node's time under leaderboard load.
//!
//! Once the memtable holds [`MEMTABLE_RECORDS`] records, or a checkpoint
//! is about to drop the journal batches it was built from
//! ([`SeenIndex::persist`]), it is frozen (still read) and the
//! `seen-compactor` thread writes it as a run. That thread also merges
//! [`FANOUT`] runs of a size into one of the next size, so a lookup probes
//! a few filters per size and every record is rewritten a few times in
//! all, off the writer's path. (Blocks stored as sled values cost the
//! compactor more than the inserts they replaced: sled rewrites a whole
//! leaf at each split, as a blob file once it passes 128 KiB.) The
//! compactor adds a run's hashes to the summary before the run is listed
//! (a merged run's keys are there already), and builds a summary twice
//! the size from the runs' stored hashes once it holds more than it was
//! sized for, and at start-up: until then lookups probe every run.
//!
//! A run exists once its description is in sled's `seen_runs` tree, which
//! is written after its file is synced; the description names the runs a
//! merge replaced, whose files go once it is durable. Start-up deletes
//! files without a description and runs another names. Each run records
//! the last journal batch whose records it (or an older run) holds, and
//! recovery indexes only the batches after it ([`SeenIndex::covered`]).
//! Since sled keeps a prefix of its writes, a checkpoint (written after the
//! runs it relies on) is never durable without them.
//!
//! Between an entity's answer and the commit that makes it durable, its
//! record is **pending**: [`crate::journal::Journal::submit`] holds it in a
//! sharded map with its journal ticket, and the writer releases it once
//! the commit is durable and the record indexed. A retry meanwhile gets
//! the first answer and waits for that ticket. (Each actor kept these in a
//! map of its own, with a timer to forget them: about a seventh of the
//! actors' time under batched load, in maps touched once and then cold.)
//!
//! A node that ran with the former `seen` tree keeps reading it for the
//! records written there (nothing moves them; it is read only while it
//! holds any). A node older than this index does not know the runs: going
//! back to one after an upgrade loses the idempotency of what the newer
//! node applied.

use crate::storage::{decode, encode, Pace, SharedBytes, StorageError, StorageResult};
use crate::Priority;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use xorf::{BinaryFuse8, BinaryFuse8Ref, DmaSerializable, Filter, FilterRef};

/// Records the memtable takes before it is cut into a run: a run a second
/// at thirty thousand events a second, a few megabytes of memory.
pub const MEMTABLE_RECORDS: usize = 128 * 1024;

/// A block (the unit a lookup reads) is cut once it holds this many bytes
/// (records are about 230 bytes under the load generator's workload).
pub const BLOCK_BYTES: usize = 8 * 1024;

/// The layout of a run's blocks (a count, then each key and value after
/// its 8-byte length): its own version, apart from the stored values'
/// `storage::FORMAT_VERSION`, which the blocks hold as opaque bytes.
const BLOCK_VERSION: u8 = 1;

/// Runs of one size merged into one of the next: lookups probe at most
/// `FANOUT - 1` runs per size, and each record is rewritten once per size.
pub const FANOUT: usize = 4;

/// Shards of the pending records' map: the actors of every arbiter add
/// to it and the writer removes from it, each shard under its own lock.
const PENDING_SHARDS: usize = 16;

/// A pending record: its value and the journal ticket that makes it
/// durable.
struct Pending {
    value: SharedBytes,
    ticket: u64,
}

/// A record [`SeenIndex::prepare`]d for [`SeenIndex::hold`].
pub struct ToHold {
    hash: u64,
    key: SharedBytes,
    value: SharedBytes,
}

/// An entry of the index's in-memory tables (pending records, memtables):
/// its key, the key's [`hash`] and a value. The hash is computed once per
/// operation and serves every table it looks in and the runs' filters:
/// with maps that hashed each key again, a lookup of a new id hashed it
/// four times and more, and hashing was 7.9 % of the node's instructions
/// under leaderboard load (docs/performance.md).
struct Keyed<V> {
    hash: u64,
    key: SharedBytes,
    value: V,
}

type Table<V> = hashbrown::HashTable<Keyed<V>>;

/// Whether an entry is `key`'s (whose hash is `hash`).
fn is<V>(hash: u64, key: &[u8]) -> impl Fn(&Keyed<V>) -> bool + '_ {
    move |entry| entry.hash == hash && *entry.key == *key
}

fn find<'a, V>(table: &'a Table<V>, hash: u64, key: &[u8]) -> Option<&'a V> {
    table.find(hash, is(hash, key)).map(|entry| &entry.value)
}

/// Puts `value` under `key`, replacing the value of a record of the same
/// key (as a map's insert does).
fn put<V>(table: &mut Table<V>, hash: u64, key: &SharedBytes, value: V) {
    match table.entry(hash, is(hash, key), |entry| entry.hash) {
        hashbrown::hash_table::Entry::Occupied(mut occupied) => occupied.get_mut().value = value,
        hashbrown::hash_table::Entry::Vacant(vacant) => {
            vacant.insert(Keyed { hash, key: key.clone(), value });
        }
    }
}

/// The key of a run's description in the `seen_runs` tree.
fn meta_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn run_file(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.run"))
}

/// The run id a file name of [`run_file`]'s gives (none for other names).
fn run_of(name: &std::ffi::OsStr) -> Option<u64> {
    u64::from_str_radix(name.to_str()?.strip_suffix(".run")?, 16).ok()
}

/// The pending map's shard of a key's hash: bits the tables' own use of
/// the hash leaves alone (hashbrown takes a bucket from the low bits and a
/// tag from the top seven), or each shard would crowd its keys into a
/// sixteenth of its buckets.
fn pending_shard_of(hash: u64) -> usize {
    (hash >> 32) as usize % PENDING_SHARDS
}

fn hash(key: &[u8]) -> u64 {
    // A hash with a fixed definition: the filters are stored.
    xxhash_rust::xxh3::xxh3_64(key)
}

/// A run's description, in sled: stored once its file is synced, so a run
/// is there exactly when its description is.
#[derive(Serialize, Deserialize)]
struct RunMeta {
    /// Every journal batch up to this one has its records in this run or
    /// another (the newest run's is the index's coverage).
    upto: u64,
    records: u64,
    /// Runs this one was merged from: gone once it is stored.
    replaces: Vec<u64>,
}

/// What a run file ends with (before its last 8 bytes: where this starts).
#[derive(Serialize, Deserialize)]
struct Footer {
    /// The first key and the offset of each block.
    fences: Vec<(ByteBuf, u64)>,
    /// The filter of the records' hashes: its descriptor and fingerprints
    /// as `xorf` lays them out for storing.
    filter_descriptor: ByteBuf,
    filter: ByteBuf,
    /// Where the keys' hashes start (right after the last block) and how
    /// many there are: distinct, ascending, 8 bytes each, little-endian.
    /// The summary is built from them. Runs written before they were
    /// stored have none: their keys are hashed again.
    hashes: Option<(u64, u64)>,
}

/// The footer of a run written before runs stored their hashes.
#[derive(Serialize, Deserialize)]
struct FooterWithoutHashes {
    fences: Vec<(ByteBuf, u64)>,
    filter_descriptor: ByteBuf,
    filter: ByteBuf,
}

impl Footer {
    fn decode(bytes: &[u8]) -> StorageResult<Self> {
        decode::<Footer>(bytes).or_else(|error| match decode::<FooterWithoutHashes>(bytes) {
            Ok(FooterWithoutHashes { fences, filter_descriptor, filter }) => {
                Ok(Footer { fences, filter_descriptor, filter, hashes: None })
            }
            Err(_) => Err(error),
        })
    }
}

/// Bits of the summary per key it is sized for: at that many keys, 0.4 %
/// of new ids get past it (see [`BlockedBloom`]).
const SUMMARY_BITS_PER_KEY: u64 = 12;

/// The smallest summary, in memtables' records.
const SUMMARY_MIN_MEMTABLES: u64 = 8;

/// A split-block Bloom filter of 64-bit hashes, which can be added to
/// while it is read: a hash picks one 64-byte block (one cache line) and
/// sets one bit in each of its eight words. At 12 bits per key about
/// 0.4 % of absent hashes get through (0.3 % for a Bloom filter that
/// spreads its bits over the whole array, which costs a cache miss per
/// bit on insert and about two per absent hash). Written here rather than
/// taken from a crate: `sbbf-rs-safe` blocks the same way but adds only
/// through `&mut` (lookups would wait on each run's hundred thousand
/// additions, or the filter be copied for each), and `fastbloom`'s
/// concurrent filter does not block its bits. The salts are the Parquet
/// format's split-block filter's.
struct BlockedBloom {
    blocks: Box<[Block]>,
}

#[repr(align(64))]
struct Block([AtomicU64; 8]);

const SALTS: [u32; 8] =
    [0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31];

impl BlockedBloom {
    fn with_capacity(keys: u64) -> Self {
        let blocks = (keys.saturating_mul(SUMMARY_BITS_PER_KEY) / 512).max(1);
        let blocks = usize::try_from(blocks).unwrap_or(usize::MAX);
        Self { blocks: (0..blocks).map(|_| Block(Default::default())).collect() }
    }

    /// The block of `hash` (from its high half) and the bit each of the
    /// block's words has for it (from its low half).
    fn locate(&self, hash: u64) -> (&Block, [u64; 8]) {
        let block = ((hash >> 32) * self.blocks.len() as u64) >> 32;
        let low = hash as u32;
        (&self.blocks[block as usize], SALTS.map(|salt| 1 << (low.wrapping_mul(salt) >> 26)))
    }

    fn insert(&self, hash: u64) {
        let (block, bits) = self.locate(hash);
        for (word, bit) in block.0.iter().zip(bits) {
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    fn contains(&self, hash: u64) -> bool {
        let (block, bits) = self.locate(hash);
        block.0.iter().zip(bits).all(|(word, bit)| word.load(Ordering::Relaxed) & bit != 0)
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.blocks)
    }
}

/// The summary: which runs' keys its filter holds, and how full it is.
struct Summary {
    filter: BlockedBloom,
    /// The runs whose every key's hash it holds.
    runs: Vec<u64>,
    /// Keys it was sized for, and hashes added to it so far (a merged
    /// run's are not added again).
    capacity: u64,
    added: u64,
}

/// The runs, newest first, and their summary (none until the compactor
/// has built it).
#[derive(Default)]
struct Runs {
    list: Vec<Arc<Run>>,
    summary: Option<Summary>,
}

struct Run {
    id: u64,
    meta: RunMeta,
    footer: Footer,
    /// The end of the last block (where the hashes, or the footer, start).
    blocks_end: u64,
    file: File,
}

impl Run {
    fn open(dir: &Path, id: u64, meta: RunMeta) -> StorageResult<Self> {
        let path = run_file(dir, id);
        let io = |e: std::io::Error| StorageError::Sync(path.display().to_string(), e);
        let file = File::open(&path).map_err(io)?;
        let length = file.metadata().map_err(io)?.len();
        let mut trailer = [0; 8];
        let corrupt = || StorageError::Codec(format!("{} is not a whole seen run", path.display()));
        let trailer_at = length.checked_sub(8).ok_or_else(corrupt)?;
        file.read_exact_at(&mut trailer, trailer_at).map_err(io)?;
        let footer_at = u64::from_le_bytes(trailer);
        let footer_length =
            usize::try_from(trailer_at.checked_sub(footer_at).ok_or_else(corrupt)?).map_err(|_| corrupt())?;
        let mut footer = vec![0; footer_length];
        file.read_exact_at(&mut footer, footer_at).map_err(io)?;
        let footer = Footer::decode(&footer)?;
        let blocks_end = match footer.hashes {
            Some((at, count)) if count.checked_mul(8).and_then(|bytes| bytes.checked_add(at)) == Some(footer_at) => at,
            Some(_) => return Err(corrupt()),
            None => footer_at,
        };
        Ok(Self { id, meta, footer, blocks_end, file })
    }

    /// Calls `add` with the hash of each of its keys: the stored ones, read
    /// a piece at a time, or for a run without them, its keys' hashes.
    fn hashes(&self, mut add: impl FnMut(u64)) -> StorageResult<()> {
        let Some((mut at, count)) = self.footer.hashes else {
            let mut source = Source::new(self);
            loop {
                source.fill()?;
                let Some((key, _)) = source.head() else { return Ok(()) };
                add(hash(key));
                source.at += 1;
            }
        };
        let end = at + count * 8;
        let mut piece = Vec::new();
        while at < end {
            let length = (end - at).min(HASHES_PIECE_BYTES);
            piece.resize(length as usize, 0);
            self.file
                .read_exact_at(&mut piece, at)
                .map_err(|e| StorageError::Sync(format!("seen run {}", self.id), e))?;
            for bytes in piece.chunks_exact(8) {
                add(u64::from_le_bytes(bytes.try_into().unwrap_or_default()));
            }
            at += length;
        }
        Ok(())
    }

    /// Its size class: 0 below `FANOUT` memtables' records, and one more
    /// for every further factor of `FANOUT`.
    fn tier(&self, memtable_records: usize) -> u32 {
        let mut tier = 0;
        let mut bound = (memtable_records * FANOUT) as u64;
        while bound <= self.meta.records {
            tier += 1;
            bound = bound.saturating_mul(FANOUT as u64);
        }
        tier
    }

    fn get(&self, key: &[u8], hash: u64) -> StorageResult<Option<Vec<u8>>> {
        let filter = BinaryFuse8Ref::from_dma(&self.footer.filter_descriptor, &self.footer.filter);
        if !filter.contains(&hash) {
            return Ok(None);
        }
        let block = self.footer.fences.partition_point(|(first, _)| first.as_slice() <= key);
        let Some(block) = block.checked_sub(1) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        self.read_block(block, &mut bytes)?;
        let records = parse_block(&bytes)?;
        let found = records.binary_search_by(|(candidate, _)| bytes[candidate.clone()].cmp(key));
        Ok(found.ok().map(|at| bytes[records[at].1.clone()].to_vec()))
    }

    fn read_block(&self, block: usize, into: &mut Vec<u8>) -> StorageResult<()> {
        let start = self.footer.fences[block].1;
        let end = self.footer.fences.get(block + 1).map_or(self.blocks_end, |(_, offset)| *offset);
        let length = end
            .checked_sub(start)
            .and_then(|length| usize::try_from(length).ok())
            .ok_or_else(|| StorageError::Codec(format!("seen run {} has its blocks out of order", self.id)))?;
        into.resize(length, 0);
        self.file.read_exact_at(into, start).map_err(|e| StorageError::Sync(format!("seen run {}", self.id), e))
    }
}

/// A block as stored is what [`encode`] makes of a `Vec<(&Bytes, &Bytes)>`
/// (the format version, the count, then each key and value after its
/// length), built and read in place: merging runs neither copies nor
/// allocates record by record.
struct BlockBuilder {
    bytes: Vec<u8>,
    count: u64,
}

impl BlockBuilder {
    fn new() -> Self {
        let mut bytes = Vec::with_capacity(BLOCK_BYTES + 512);
        bytes.push(BLOCK_VERSION);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        Self { bytes, count: 0 }
    }

    fn push(&mut self, key: &[u8], value: &[u8]) {
        for part in [key, value] {
            self.bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            self.bytes.extend_from_slice(part);
        }
        self.count += 1;
    }

    /// The block's bytes; the builder starts the next.
    fn finish(&mut self) -> &[u8] {
        self.bytes[1..9].copy_from_slice(&self.count.to_le_bytes());
        &self.bytes
    }

    fn clear(&mut self) {
        self.bytes.truncate(9);
        self.count = 0;
    }
}

/// Where the records of a stored block are: key and value ranges.
fn parse_block(bytes: &[u8]) -> StorageResult<Vec<(Range<usize>, Range<usize>)>> {
    let truncated = || StorageError::Codec("a seen block is truncated".into());
    match bytes.first() {
        Some(&BLOCK_VERSION) => {}
        Some(version) => {
            return Err(StorageError::Codec(format!(
                "seen block has format version {version}; this build reads up to {BLOCK_VERSION} (upgrade the node)"
            )))
        }
        None => return Err(truncated()),
    }
    let read_u64 = |at: &mut usize| -> StorageResult<usize> {
        let field = bytes.get(*at..*at + 8).ok_or_else(truncated)?;
        *at += 8;
        usize::try_from(u64::from_le_bytes(field.try_into().map_err(|_| truncated())?)).map_err(|_| truncated())
    };
    let read_part = |at: &mut usize| -> StorageResult<Range<usize>> {
        let length = read_u64(at)?;
        let part = *at..at.checked_add(length).filter(|end| *end <= bytes.len()).ok_or_else(truncated)?;
        *at = part.end;
        Ok(part)
    };
    let mut at = 1;
    let count = read_u64(&mut at)?;
    let mut records = Vec::with_capacity(count.min(BLOCK_BYTES / 16));
    for _ in 0..count {
        records.push((read_part(&mut at)?, read_part(&mut at)?));
    }
    Ok(records)
}

/// A run is handed to the disk in pieces of this size as it is written
/// (see [`write_back`]).
const WRITE_BACK_BYTES: u64 = 1 << 20;

/// A run's stored hashes are read this many bytes at a time.
const HASHES_PIECE_BYTES: u64 = 512 * 1024;

/// Writes `from..to` of a run's file back to the disk and waits for it,
/// without the cache flush a sync costs: the journal's durable writes then
/// queue behind a mebibyte of the run at most, not behind all of it at its
/// final sync (a 30 MiB run written and synced at once held them up to
/// 20 ms; written back a mebibyte at a time, 5-7 ms, the run itself
/// 10 % slower). Durability still comes from that final sync; a failure
/// here only loses the pacing.
fn write_back(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: a plain system call on a descriptor `file` keeps open.
        let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), from as i64, (to - from) as i64, flags) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

/// Writes one run file, block by block, from records in key order.
struct RunWriter<'a> {
    inner: &'a Inner,
    id: u64,
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    /// Where the last [`write_back`] ended.
    written_back: u64,
    block: BlockBuilder,
    fences: Vec<(ByteBuf, u64)>,
    hashes: Vec<u64>,
    records: u64,
    finished: bool,
}

impl Drop for RunWriter<'_> {
    /// A run that failed half-way leaves no file (start-up would delete it).
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl<'a> RunWriter<'a> {
    fn start(inner: &'a Inner) -> StorageResult<Self> {
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let path = run_file(&inner.dir, id);
        let file = File::create(&path).map_err(|e| StorageError::Sync(path.display().to_string(), e))?;
        Ok(Self {
            inner,
            id,
            path,
            out: BufWriter::with_capacity(256 * 1024, file),
            offset: 0,
            written_back: 0,
            block: BlockBuilder::new(),
            fences: Vec::new(),
            hashes: Vec::new(),
            records: 0,
            finished: false,
        })
    }

    fn io(&self) -> impl Fn(std::io::Error) -> StorageError + '_ {
        |e| StorageError::Sync(self.path.display().to_string(), e)
    }

    fn push(&mut self, key: &[u8], value: &[u8]) -> StorageResult<()> {
        self.push_hashed(key, value, hash(key))
    }

    /// [`RunWriter::push`] of a key whose [`hash`] is known.
    fn push_hashed(&mut self, key: &[u8], value: &[u8], hash: u64) -> StorageResult<()> {
        if self.block.count == 0 {
            self.fences.push((ByteBuf::from(key), self.offset));
        }
        self.hashes.push(hash);
        self.block.push(key, value);
        self.records += 1;
        if BLOCK_BYTES <= self.block.bytes.len() {
            self.write_block()?;
        }
        Ok(())
    }

    fn write_block(&mut self) -> StorageResult<()> {
        let bytes = self.block.finish();
        self.out.write_all(bytes).map_err(|e| StorageError::Sync(self.path.display().to_string(), e))?;
        self.offset += bytes.len() as u64;
        self.block.clear();
        if WRITE_BACK_BYTES <= self.offset - self.written_back {
            self.out.flush().map_err(self.io())?;
            write_back(self.out.get_ref(), self.written_back, self.offset);
            self.written_back = self.offset;
        }
        Ok(())
    }

    /// Writes the hashes and the footer, syncs the file, then stores the
    /// description; returns the run and its hashes.
    fn finish(mut self, upto: u64, replaces: Vec<u64>) -> StorageResult<(Run, Vec<u64>)> {
        if 0 < self.block.count {
            self.write_block()?;
        }
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.sort_unstable();
        hashes.dedup();
        let hashes_at = self.offset;
        for hash in &hashes {
            self.out.write_all(&hash.to_le_bytes()).map_err(self.io())?;
        }
        self.offset += 8 * hashes.len() as u64;
        let filter = BinaryFuse8::try_from(&hashes)
            .map_err(|e| StorageError::Codec(format!("building the filter of seen run {}: {e}", self.id)))?;
        let mut descriptor = vec![0; BinaryFuse8::DESCRIPTOR_LEN];
        filter.dma_copy_descriptor_to(&mut descriptor);
        let footer = Footer {
            fences: std::mem::take(&mut self.fences),
            filter_descriptor: ByteBuf::from(descriptor),
            filter: ByteBuf::from(filter.fingerprints),
            hashes: Some((hashes_at, hashes.len() as u64)),
        };
        let footer = encode(&footer);
        self.out.write_all(&footer).map_err(self.io())?;
        self.out.write_all(&self.offset.to_le_bytes()).map_err(self.io())?;
        self.out.flush().map_err(self.io())?;
        self.out.get_ref().sync_all().map_err(self.io())?;
        self.inner.written_bytes.fetch_add(self.offset + footer.len() as u64 + 8, Ordering::Relaxed);
        crate::storage::sync_dir(&self.inner.dir)?;
        let meta = RunMeta { upto, records: self.records, replaces };
        self.inner.tree.insert(meta_key(self.id), encode(&meta))?;
        self.finished = true;
        Ok((Run::open(&self.inner.dir, self.id, meta)?, hashes))
    }
}

/// Deletes a run's description, then its file, at `pace` (a merge's
/// inputs go spread out: hundreds of megabytes freed at once held the
/// journal's commits, see [`crate::storage::GIVE_BACK_STEP_BYTES`]).
fn delete_run(tree: &sled::Tree, dir: &Path, id: u64, pace: Pace) -> StorageResult<()> {
    tree.remove(meta_key(id))?;
    crate::storage::remove_file(&run_file(dir, id), pace, &|| false).map(drop)
}

#[derive(Default)]
struct Memtable {
    /// Shared with the journal entries they came from: indexing a record
    /// copies nothing.
    records: Table<SharedBytes>,
    /// The last journal batch indexed.
    upto: Option<u64>,
}

/// A memtable's map, sized for the records it takes before it is frozen:
/// grown by doubling, rehashing was most of the writer's cost of indexing
/// a record.
fn presized(records: usize) -> Table<SharedBytes> {
    Table::with_capacity(records)
}

struct Frozen {
    records: Table<SharedBytes>,
    upto: u64,
    /// How many memtables were frozen before it, and it.
    generation: u64,
}

/// What the compactor is asked to do and has done, shared with its
/// thread apart from the index (which the thread holds only while it
/// works, so that dropping the index ends it).
#[derive(Default)]
struct Signal {
    state: Mutex<Progress>,
    /// The compactor waits on this for work.
    work: Condvar,
    /// Callers wait on this for the compactor's progress.
    progress: Condvar,
}

#[derive(Default)]
struct Progress {
    requested: bool,
    busy: bool,
    /// The index is gone: the compactor ends.
    closed: bool,
    /// Frozen memtables written as runs so far (they go in order).
    written: u64,
    /// Why the compactor's last attempt failed, until one succeeds.
    failed: Option<String>,
}

struct Inner {
    /// The runs' descriptions.
    tree: sled::Tree,
    /// The run files.
    dir: PathBuf,
    /// Makes the store's writes durable (before a merge deletes its inputs).
    flush: Flush,
    memtable_records: usize,
    /// The former `seen` tree, while it holds records.
    legacy: Option<sled::Tree>,
    /// Records handed to the journal and not yet durable and indexed.
    pending: [Mutex<Table<Pending>>; PENDING_SHARDS],
    memtable: RwLock<Memtable>,
    /// Cut memtables not written as runs yet, oldest first.
    frozen: RwLock<VecDeque<Arc<Frozen>>>,
    /// The map of the last memtable written as a run, emptied, for the
    /// next freeze. A fresh one was 8 MiB of memory the writer then
    /// touched page by page as its first inserts scattered over it: on
    /// this machine's VM, where first-touch faults are slow, its commit
    /// right after a freeze took 50 ms instead of one, and the open
    /// loop's latency behind it ten times its usual p99.
    spare: Mutex<Option<Table<SharedBytes>>>,
    /// Changed by the compactor alone.
    runs: RwLock<Runs>,
    /// Runs' filters probed by lookups so far.
    run_probes: AtomicU64,
    /// Bytes of run files written, new runs and merges.
    written_bytes: AtomicU64,
    /// The last attempt to build the summary failed (and was logged).
    summary_failed: AtomicBool,
    next_id: AtomicU64,
    /// Memtables frozen so far.
    freezes: AtomicU64,
    signal: Arc<Signal>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.signal.state.lock().closed = true;
        self.signal.work.notify_all();
    }
}

/// Makes every write to the store so far durable ([`crate::storage::Store::flush`]).
pub type Flush = Arc<dyn Fn() -> StorageResult<()> + Send + Sync>;

/// The index; cheap to clone. Its compactor thread ends once the last
/// clone is dropped.
#[derive(Clone)]
pub struct SeenIndex {
    inner: Arc<Inner>,
}

/// How many runs and records the index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenStats {
    pub runs: usize,
    pub run_records: u64,
    pub memory_records: usize,
    /// Records held until their commit is durable.
    pub pending_records: usize,
    /// Runs whose keys the summary holds (lookups of new ids skip them).
    pub summarized_runs: usize,
    /// The summary's filter, in bytes.
    pub summary_bytes: usize,
    /// Runs' own filters probed by lookups so far.
    pub run_probes: u64,
    /// Bytes of run files written since the index was opened.
    pub written_bytes: u64,
}

impl SeenIndex {
    /// Opens the index in `db`: finishes what a crash interrupted (a run
    /// half written, runs merged but not deleted), loads the runs'
    /// descriptions and starts the compactor.
    pub fn open(db: &sled::Db, dir: &Path, flush: Flush) -> StorageResult<Self> {
        Self::open_with(db, dir, flush, MEMTABLE_RECORDS)
    }

    /// The same, cutting the memtable at `memtable_records` (tests).
    pub fn open_with(db: &sled::Db, dir: &Path, flush: Flush, memtable_records: usize) -> StorageResult<Self> {
        let io = |e: std::io::Error| StorageError::Sync(dir.display().to_string(), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        if let Some(parent) = dir.parent() {
            crate::storage::sync_dir(parent)?;
        }
        let tree = db.open_tree("seen_runs")?;
        let mut metas = std::collections::BTreeMap::new();
        for item in tree.iter() {
            let (key, value) = item?;
            let id = key.as_ref().try_into().map(u64::from_be_bytes);
            let id = id.map_err(|_| StorageError::Codec("seen run key is not 8 bytes".into()))?;
            metas.insert(id, decode::<RunMeta>(&value)?);
        }
        // A merge stored its run but had not deleted its inputs yet.
        let replaced: std::collections::BTreeSet<u64> =
            metas.values().flat_map(|meta| meta.replaces.iter().copied()).collect();
        for id in &replaced {
            metas.remove(id);
            delete_run(&tree, dir, *id, Pace::AtOnce)?;
        }
        // A run file without a description was cut short by a crash.
        let mut next_id = replaced.iter().chain(metas.keys()).map(|id| id + 1).max().unwrap_or(0);
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let Some(id) = run_of(&entry.map_err(io)?.file_name()) else { continue };
            next_id = next_id.max(id + 1);
            if !metas.contains_key(&id) {
                delete_run(&tree, dir, id, Pace::AtOnce)?;
            }
        }
        let mut runs = Runs::default();
        for (id, meta) in metas.into_iter().rev() {
            runs.list.push(Arc::new(Run::open(dir, id, meta)?));
        }
        let legacy = db.open_tree("seen")?;
        let legacy = (!legacy.is_empty()).then_some(legacy);
        let signal = Arc::new(Signal::default());
        let inner = Arc::new(Inner {
            tree,
            dir: dir.to_owned(),
            flush,
            memtable_records: memtable_records.max(1),
            legacy,
            pending: Default::default(),
            memtable: RwLock::new(Memtable { records: presized(memtable_records.max(1)), upto: None }),
            frozen: RwLock::default(),
            spare: Mutex::default(),
            runs: RwLock::new(runs),
            run_probes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            summary_failed: AtomicBool::new(false),
            next_id: AtomicU64::new(next_id),
            freezes: AtomicU64::new(0),
            signal: signal.clone(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("seen-compactor".into())
            // Its priority follows its backlog (`keep_pace`).
            .spawn(move || compact(&weak, &signal))
            .map_err(|e| StorageError::Unavailable(format!("starting the seen index's compactor: {e}")))?;
        // Merges the last run left undone, and builds the summary.
        let index = Self { inner };
        index.wake();
        Ok(index)
    }

    /// The record of `key`, pending or indexed; a pending one comes with
    /// the journal ticket to wait for before it is durable.
    pub fn lookup(&self, key: &[u8]) -> StorageResult<Option<(Vec<u8>, Option<u64>)>> {
        let hash = hash(key);
        if let Some(pending) = find(&self.pending_shard(hash).lock(), hash, key) {
            return Ok(Some((pending.value.to_vec(), Some(pending.ticket))));
        }
        // Released only once indexed: a record that just left the pending
        // map is in the memtable.
        Ok(self.get_hashed(key, hash)?.map(|value| (value, None)))
    }

    fn pending_shard(&self, hash: u64) -> &Mutex<Table<Pending>> {
        &self.inner.pending[pending_shard_of(hash)]
    }

    /// A record made ready to hold, so that holding it (which the journal
    /// does under its queue's lock) is one insert.
    pub fn prepare(&self, key: SharedBytes, value: SharedBytes) -> ToHold {
        ToHold { hash: hash(&key), key, value }
    }

    /// Holds a record handed to the journal under `ticket` until
    /// [`SeenIndex::release`]: the journal calls it before the writer can
    /// see the entry. A later record of the same key replaces it, as it
    /// does in the index.
    pub fn hold(&self, ToHold { hash, key, value }: ToHold, ticket: u64) {
        put(&mut self.pending_shard(hash).lock(), hash, &key, Pending { value, ticket });
    }

    /// Lets go of pending records once their commit (the last of whose
    /// entries has ticket `upto`) is durable and they are indexed, or left
    /// out of the index on purpose. A record of the same key held since,
    /// by an entry of a later commit, stays.
    pub fn release<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>, upto: u64) {
        for key in keys {
            let hash = hash(key);
            let mut shard = self.pending_shard(hash).lock();
            if let Ok(entry) = shard.find_entry(hash, is(hash, key)) {
                if entry.get().value.ticket <= upto {
                    entry.remove();
                }
            }
        }
    }

    /// The indexed record of `key`, if any (not a pending one).
    pub fn get(&self, key: impl AsRef<[u8]>) -> StorageResult<Option<Vec<u8>>> {
        let key = key.as_ref();
        self.get_hashed(key, hash(key))
    }

    /// [`SeenIndex::get`] of a key whose [`hash`] is known.
    fn get_hashed(&self, key: &[u8], hash: u64) -> StorageResult<Option<Vec<u8>>> {
        // Memtable, then frozen ones, then runs: a record moves the other
        // way, each step published before the last is retired, so a lookup
        // that missed it in one place finds it in the next.
        if let Some(value) = find(&self.inner.memtable.read().records, hash, key) {
            return Ok(Some(value.to_vec()));
        }
        for frozen in self.inner.frozen.read().iter().rev() {
            if let Some(value) = find(&frozen.records, hash, key) {
                return Ok(Some(value.to_vec()));
            }
        }
        let runs = self.inner.runs.read();
        // The runs the summary says lack the key (nearly all, for a new id).
        let lacking = match &runs.summary {
            Some(summary) if !summary.filter.contains(hash) => summary.runs.as_slice(),
            _ => &[],
        };
        let mut probes = 0;
        let mut found = Ok(None);
        // The summary's runs are always listed ones (`publish` and
        // `build_summary` keep them so): as many means all of them.
        let all_lacking = lacking.len() == runs.list.len();
        for run in runs.list.iter().filter(|run| !all_lacking && !lacking.contains(&run.id)) {
            probes += 1;
            found = run.get(key, hash);
            if !matches!(found, Ok(None)) {
                break;
            }
        }
        drop(runs);
        if 0 < probes {
            self.inner.run_probes.fetch_add(probes, Ordering::Relaxed);
        }
        if let Some(value) = found? {
            return Ok(Some(value));
        }
        match &self.inner.legacy {
            Some(legacy) => Ok(legacy.get(key)?.map(|value| value.to_vec())),
            None => Ok(None),
        }
    }

    /// Indexes the records of journal batch `batch` (and every batch
    /// before it, which callers index in order).
    pub fn insert<'a>(&self, batch: u64, records: impl IntoIterator<Item = &'a (SharedBytes, SharedBytes)>) {
        let mut memtable = self.inner.memtable.write();
        for (key, value) in records {
            put(&mut memtable.records, hash(key), key, value.clone());
        }
        memtable.upto = memtable.upto.max(Some(batch));
        if self.inner.memtable_records <= memtable.records.len() {
            self.freeze(&mut memtable);
        }
    }

    /// Freezes the memtable if it holds records; returns how many have
    /// been frozen so far.
    fn freeze(&self, memtable: &mut Memtable) -> u64 {
        let (Some(upto), false) = (memtable.upto, memtable.records.is_empty()) else {
            return self.inner.freezes.load(Ordering::SeqCst);
        };
        let next = self.inner.spare.lock().take().unwrap_or_else(|| presized(self.inner.memtable_records));
        let records = std::mem::replace(&mut memtable.records, next);
        let generation = self.inner.freezes.fetch_add(1, Ordering::SeqCst) + 1;
        // Published before the memtable lets go of them.
        self.inner.frozen.write().push_back(Arc::new(Frozen { records, upto, generation }));
        self.wake();
        generation
    }

    fn wake(&self) {
        self.inner.signal.state.lock().requested = true;
        self.inner.signal.work.notify_all();
    }

    /// Writes every record indexed so far as runs, and returns once they
    /// are written (durable with the next flush): before a checkpoint drops
    /// the journal batches that hold them.
    pub fn persist(&self) -> StorageResult<()> {
        // Only what was frozen by now: under load, memtables frozen later
        // would keep it waiting.
        let frozen = self.freeze(&mut self.inner.memtable.write());
        let mut progress = self.inner.signal.state.lock();
        while progress.written < frozen {
            if let Some(error) = &progress.failed {
                return Err(StorageError::Unavailable(format!("the seen index's compactor failed: {error}")));
            }
            self.inner.signal.progress.wait(&mut progress);
        }
        Ok(())
    }

    /// Waits until the compactor has nothing left to do (tests).
    pub fn wait_idle(&self) -> StorageResult<()> {
        let mut progress = self.inner.signal.state.lock();
        while progress.requested || progress.busy {
            // A failure while busy is the last attempt's: this one may pass.
            if let (Some(error), false) = (&progress.failed, progress.busy) {
                return Err(StorageError::Unavailable(format!("the seen index's compactor stopped: {error}")));
            }
            self.inner.signal.progress.wait(&mut progress);
        }
        Ok(())
    }

    /// The last journal batch whose records are all in runs: recovery
    /// indexes the batches after it.
    pub fn covered(&self) -> Option<u64> {
        self.inner.runs.read().list.iter().map(|run| run.meta.upto).max()
    }

    pub fn stats(&self) -> SeenStats {
        let runs = self.inner.runs.read();
        let frozen: usize = self.inner.frozen.read().iter().map(|frozen| frozen.records.len()).sum();
        SeenStats {
            runs: runs.list.len(),
            run_records: runs.list.iter().map(|run| run.meta.records).sum(),
            memory_records: self.inner.memtable.read().records.len() + frozen,
            pending_records: self.inner.pending.iter().map(|shard| shard.lock().len()).sum(),
            summarized_runs: runs.summary.as_ref().map_or(0, |summary| summary.runs.len()),
            summary_bytes: runs.summary.as_ref().map_or(0, |summary| summary.filter.bytes()),
            run_probes: self.inner.run_probes.load(Ordering::Relaxed),
            written_bytes: self.inner.written_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The compactor: writes frozen memtables as runs, oldest first, and
/// merges runs between them, until the index is dropped. A failed attempt
/// (a full disk) is retried after a pause that doubles up to a minute;
/// until one succeeds, checkpoints fail (the journal keeps what they would
/// drop) and frozen memtables stay in memory.
fn compact(inner: &Weak<Inner>, signal: &Signal) {
    /// Reports a panic as a failure, so that no caller waits for ever.
    struct Failed<'a>(&'a Signal);
    impl Drop for Failed<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut progress = self.0.state.lock();
                progress.busy = false;
                progress.failed = Some("it panicked".into());
                self.0.progress.notify_all();
            }
        }
    }
    let _failed = Failed(signal);
    let mut pause = RETRY_PAUSE;
    loop {
        {
            let mut progress = signal.state.lock();
            while !progress.requested && !progress.closed {
                signal.work.wait(&mut progress);
            }
            if progress.closed {
                return;
            }
            progress.requested = false;
            progress.busy = true;
        }
        // The index is held only here, and let go before the lock is
        // taken: its last holder's drop takes the lock too.
        let (result, frozen) = match inner.upgrade() {
            Some(inner) => {
                let result = (|| {
                    write_frozen(&inner)?;
                    while merge_once(&inner)? {
                        write_frozen(&inner)?;
                    }
                    summarize(&inner, true);
                    Ok::<_, StorageError>(())
                })();
                let frozen = inner.frozen.read().len();
                (result, frozen)
            }
            None => return,
        };
        let mut progress = signal.state.lock();
        progress.busy = false;
        match result {
            Ok(()) => {
                progress.failed = None;
                pause = RETRY_PAUSE;
                signal.progress.notify_all();
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    frozen_memtables = frozen,
                    retry_in_s = pause.as_secs(),
                    "the seen index's compactor failed; checkpoints fail until it succeeds"
                );
                progress.failed = Some(error.to_string());
                signal.progress.notify_all();
                let _ = signal.work.wait_for(&mut progress, pause);
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
                progress.requested = true;
            }
        }
    }
}

/// The compactor's first pause after a failure, and its longest.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(60);

/// Frozen memtables waiting to be written that mean the compactor falls
/// behind: it leaves idle priority until it has caught up.
const BEHIND: usize = 2;

thread_local! {
    /// The compactor thread's priority as last set, and whether it has
    /// warned that it could not leave idle priority.
    static PRIORITY: std::cell::Cell<(Option<Priority>, bool)> = const { std::cell::Cell::new((None, false)) };
}

/// Sets the compactor thread's priority for its backlog: idle while it
/// keeps up (see [`Priority::Idle`]), background once [`BEHIND`]
/// memtables wait, so that a node busy for long does not pile them up
/// in memory (nor keep a checkpoint, which waits for them, from moving).
fn keep_pace(inner: &Inner) {
    prioritize(match BEHIND <= inner.frozen.read().len() {
        true => Priority::Background,
        false => Priority::Idle,
    });
}

/// Sets the compactor thread's priority (once; it warns once if it
/// cannot).
fn prioritize(wanted: Priority) {
    let (current, warned) = PRIORITY.get();
    if current == Some(wanted) {
        return;
    }
    match crate::set_priority(wanted) {
        Ok(()) => PRIORITY.set((Some(wanted), warned)),
        Err(error) if !warned => {
            PRIORITY.set((current, true));
            tracing::warn!(
                %error,
                ?wanted,
                "the idempotency index's compactor could not change its priority (to leave idle priority when it \
                 falls behind, the node needs CAP_SYS_NICE or an RLIMIT_NICE of 10 or more)"
            );
        }
        Err(_) => {}
    }
}

fn write_frozen(inner: &Inner) -> StorageResult<()> {
    // First, if the runs written since it was built outgrew the summary:
    // this is called between the steps of a merge too, which can take
    // minutes on a busy node, and an overfull summary lets most new ids by.
    summarize(inner, false);
    keep_pace(inner);
    loop {
        let Some(frozen) = inner.frozen.read().front().cloned() else { return Ok(()) };
        let mut records: Vec<_> = frozen.records.iter().collect();
        records.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut writer = RunWriter::start(inner)?;
        for record in records {
            writer.push_hashed(&record.key, &record.value, record.hash)?;
        }
        let (run, hashes) = writer.finish(frozen.upto, Vec::new())?;
        // Published before the frozen memtable goes (see `SeenIndex::get`).
        publish(inner, run, &hashes, &[]);
        inner.frozen.write().pop_front();
        inner.signal.state.lock().written = frozen.generation;
        inner.signal.progress.notify_all();
        // Its map, emptied here, is the next memtable's (unless a lookup
        // still holds it: then a fresh one is made when needed).
        if let Ok(Frozen { mut records, .. }) = Arc::try_unwrap(frozen) {
            records.clear();
            if inner.memtable_records <= records.capacity() {
                *inner.spare.lock() = Some(records);
            }
        }
    }
}

/// Lists a run written from a memtable or merged from `replaces` (which
/// it takes the place of), with its keys in the summary: added to it
/// first, unless the runs it was merged from are all summarized already.
fn publish(inner: &Inner, run: Run, hashes: &[u64], replaces: &[Arc<Run>]) {
    let summarized = |summary: &Summary, run: &Arc<Run>| summary.runs.contains(&run.id);
    // Only the compactor changes the runs: the summary is the same below.
    let added = match &inner.runs.read().summary {
        Some(summary) if !replaces.is_empty() && replaces.iter().all(|input| summarized(summary, input)) => Some(0),
        Some(summary) => {
            for &hash in hashes {
                summary.filter.insert(hash);
            }
            Some(hashes.len() as u64)
        }
        None => None,
    };
    let mut runs = inner.runs.write();
    let id = run.id;
    runs.list.retain(|listed| !replaces.iter().any(|input| input.id == listed.id));
    runs.list.push(Arc::new(run));
    runs.list.sort_by_key(|run| std::cmp::Reverse(run.id));
    if let (Some(summary), Some(added)) = (&mut runs.summary, added) {
        summary.runs.retain(|summarized| !replaces.iter().any(|input| input.id == *summarized));
        summary.runs.push(id);
        summary.added += added;
    }
}

/// Builds the summary if there is none, or a larger one if it holds more
/// hashes than it was sized for: from the stored hashes of every run,
/// twice their number (at least [`SUMMARY_MIN_MEMTABLES`] memtables'),
/// then puts it in place of the last at once. Lookups use the last one
/// meanwhile (or probe every run). A failure (reading a run's hashes) is
/// logged, once until a build succeeds, and never stops the compactor:
/// the summary only spares lookups work, and runs must still be written
/// for checkpoints to go on. After a failure it is tried again only at
/// the end of a compactor's pass (`after_failure`), not between the
/// steps of a merge.
fn summarize(inner: &Inner, after_failure: bool) {
    let needed = match &inner.runs.read().summary {
        Some(summary) => summary.capacity < summary.added,
        None => true,
    };
    if !needed || (!after_failure && inner.summary_failed.load(Ordering::Relaxed)) {
        return;
    }
    match build_summary(inner) {
        Ok(()) => inner.summary_failed.store(false, Ordering::Relaxed),
        Err(error) => {
            if !inner.summary_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %error,
                    "the seen index's summary could not be built; lookups probe every run's filter until it is"
                );
            }
        }
    }
}

fn build_summary(inner: &Inner) -> StorageResult<()> {
    let list = inner.runs.read().list.clone();
    // Not idle: on a busy node lookups would probe every run meanwhile.
    prioritize(Priority::Background);
    let records: u64 = list.iter().map(|run| run.meta.records).sum();
    let capacity = (2 * records).max(SUMMARY_MIN_MEMTABLES * inner.memtable_records as u64);
    let filter = BlockedBloom::with_capacity(capacity);
    let mut added = 0;
    for run in &list {
        run.hashes(|hash| {
            filter.insert(hash);
            added += 1;
        })?;
    }
    let runs = list.iter().map(|run| run.id).collect();
    inner.runs.write().summary = Some(Summary { filter, runs, capacity, added });
    tracing::debug!(runs = list.len(), hashes = added, capacity, "the seen index's summary is built");
    Ok(())
}

/// Merges the oldest `FANOUT` runs of the smallest size that has that
/// many; whether there were.
fn merge_once(inner: &Inner) -> StorageResult<bool> {
    let inputs: Vec<Arc<Run>> = {
        let mut tiers: std::collections::BTreeMap<u32, Vec<Arc<Run>>> = Default::default();
        for run in inner.runs.read().list.iter().rev() {
            tiers.entry(run.tier(inner.memtable_records)).or_default().push(run.clone());
        }
        match tiers.into_values().find(|runs| FANOUT <= runs.len()) {
            Some(mut runs) => {
                runs.truncate(FANOUT);
                runs
            }
            None => return Ok(false),
        }
    };
    let (merged, hashes) = merge_runs(inner, &inputs)?;
    publish(inner, merged, &hashes, &inputs);
    // Once the merged run's description, which names them, is durable: a
    // crash before they are all gone leaves the rest to start-up.
    (inner.flush)()?;
    for input in &inputs {
        delete_run(&inner.tree, &inner.dir, input.id, Pace::Spread)?;
        // An input takes up to a second to go: memtables frozen meanwhile
        // are written in between.
        write_frozen(inner)?;
    }
    Ok(true)
}

/// One input of a merge: its records in order, a block at a time.
struct Source<'a> {
    run: &'a Run,
    next_block: usize,
    bytes: Vec<u8>,
    records: Vec<(Range<usize>, Range<usize>)>,
    at: usize,
}

impl<'a> Source<'a> {
    fn new(run: &'a Run) -> Self {
        Self { run, next_block: 0, bytes: Vec::new(), records: Vec::new(), at: 0 }
    }

    /// Reads blocks until one has a record at `at`, or there are none.
    fn fill(&mut self) -> StorageResult<()> {
        while self.records.len() <= self.at && self.next_block < self.run.footer.fences.len() {
            self.run.read_block(self.next_block, &mut self.bytes)?;
            self.records = parse_block(&self.bytes)?;
            self.next_block += 1;
            self.at = 0;
        }
        Ok(())
    }

    fn head(&self) -> Option<(&[u8], &[u8])> {
        let (key, value) = self.records.get(self.at)?;
        Some((&self.bytes[key.clone()], &self.bytes[value.clone()]))
    }
}

/// Writes the records of `inputs` (oldest first) as one run; a key in
/// more than one keeps the newest input's record.
fn merge_runs(inner: &Inner, inputs: &[Arc<Run>]) -> StorageResult<(Run, Vec<u64>)> {
    let mut writer = RunWriter::start(inner)?;
    let mut sources: Vec<_> = inputs.iter().map(|run| Source::new(run)).collect();
    loop {
        for source in &mut sources {
            source.fill()?;
        }
        // The smallest key; of equal ones the newest input's.
        let next = sources
            .iter()
            .enumerate()
            .filter_map(|(at, source)| source.head().map(|(key, _)| (at, key)))
            .min_by(|(a, a_key), (b, b_key)| a_key.cmp(b_key).then(b.cmp(a)))
            .map(|(at, _)| at);
        let Some(next) = next else { break };
        // Every input's record of this key is passed (the newest input's
        // is written): the others' while the key is borrowed from `next`'s
        // block, then its own.
        let (before, rest) = sources.split_at_mut(next);
        let Some((chosen, after)) = rest.split_first_mut() else { break };
        let Some((key, value)) = chosen.head() else { break };
        writer.push(key, value)?;
        for source in before.iter_mut().chain(after) {
            if source.head().is_some_and(|(other, _)| other == key) {
                source.at += 1;
            }
        }
        chosen.at += 1;
        // A large merge takes seconds: memtables frozen meanwhile (which a
        // checkpoint may wait for) are written first.
        if writer.records % 4096 == 0 && !inner.frozen.read().is_empty() {
            write_frozen(inner)?;
        }
    }
    let upto = inputs.iter().map(|run| run.meta.upto).max().unwrap_or(0);
    writer.finish(upto, inputs.iter().map(|run| run.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database and its index in `dir`.
    fn open(dir: &tempfile::TempDir, memtable_records: usize) -> (sled::Db, SeenIndex) {
        let db = sled::open(dir.path().join("db")).expect("open");
        (db.clone(), reopen(dir, &db, memtable_records))
    }

    fn reopen(dir: &tempfile::TempDir, db: &sled::Db, memtable_records: usize) -> SeenIndex {
        let flushed = db.clone();
        let flush: Flush = Arc::new(move || flushed.flush().map(drop).map_err(StorageError::from));
        SeenIndex::open_with(db, &dir.path().join("seen"), flush, memtable_records).expect("open the index")
    }

    fn key(n: u64) -> Vec<u8> {
        format!("t/event/e-{n:06}").into_bytes()
    }

    fn value(n: u64) -> Vec<u8> {
        format!("answer {n}").into_bytes()
    }

    fn shared(key: Vec<u8>, value: Vec<u8>) -> (SharedBytes, SharedBytes) {
        (key.into(), value.into())
    }

    /// Indexes records `from..to`, ten per batch, batches numbered by
    /// their first record / 10.
    fn index(seen: &SeenIndex, from: u64, to: u64) {
        let mut n = from;
        while n < to {
            let batch: Vec<_> = (n..(n + 10).min(to)).map(|n| shared(key(n), value(n))).collect();
            seen.insert(n / 10, &batch);
            n += 10;
        }
    }

    fn assert_holds(seen: &SeenIndex, range: std::ops::Range<u64>) {
        for n in range {
            assert_eq!(seen.get(key(n)).expect("get"), Some(value(n)), "record {n}");
        }
    }

    #[test]
    fn records_are_found_in_the_memtable_in_runs_and_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, seen) = open(&dir, 100);
        assert_eq!(seen.covered(), None);
        index(&seen, 0, 1_000);
        seen.persist().expect("persist");
        assert_holds(&seen, 0..1_000);
        // Ten runs of a hundred were cut; four of a size merge into one:
        // two of 400 and two of 100 are left.
        seen.wait_idle().expect("idle");
        let stats = seen.stats();
        assert_eq!(
            (stats.runs, stats.run_records, stats.memory_records, stats.pending_records, stats.summarized_runs),
            (4, 1_000, 0, 0, 4),
            "{stats:?}"
        );
        assert_eq!(seen.covered(), Some(99));
        // Every byte of the runs on disk was counted as written, and more:
        // the eight runs merged away were written too.
        let on_disk: u64 = run_files(&seen.inner.dir)
            .into_iter()
            .map(|id| std::fs::metadata(run_file(&seen.inner.dir, id)).expect("a run file").len())
            .sum();
        assert!(0 < on_disk && on_disk < stats.written_bytes, "{on_disk} on disk, {stats:?}");
        // Unknown ids, before, between and after the stored ones.
        for missing in [b"t/event/a".as_slice(), b"t/event/e-000000x", b"t/event/e-001000", b"u"] {
            assert_eq!(seen.get(missing).expect("get"), None);
        }
        index(&seen, 1_000, 1_050);
        seen.wait_idle().expect("idle");
        drop(seen);
        // Records only in the memtable are gone with it (recovery indexes
        // them again from the journal); runs stay.
        let seen = reopen(&dir, &db, 100);
        assert_holds(&seen, 0..1_000);
        assert_eq!(seen.get(key(1_000)).expect("get"), None);
        assert_eq!(seen.covered(), Some(99));
        let stats = seen.stats();
        assert_eq!(stats.run_records, 1_000, "{stats:?}");
    }

    /// Runs' filters probed by lookups of `count` ids never indexed.
    fn probes_for_new_ids(seen: &SeenIndex, count: u64) -> u64 {
        let before = seen.stats().run_probes;
        for n in 0..count {
            assert_eq!(seen.get(format!("t/event/new-{n}")).expect("get"), None);
        }
        seen.stats().run_probes - before
    }

    #[test]
    fn the_summary_spares_new_ids_the_runs_filters_as_it_grows_and_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, seen) = open(&dir, 100);
        // Fifty memtables: the summary, first sized for 800 keys, is built
        // larger twice on the way, each time from the runs' stored hashes.
        index(&seen, 0, 5_000);
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        let stats = seen.stats();
        assert!(4 <= stats.runs, "{stats:?}");
        assert_eq!(stats.summarized_runs, stats.runs, "{stats:?}");
        // Sized for every key at least, twice them at most, 12 bits a key.
        assert!((5_000 * 12 / 8 - 64..=10_000 * 12 / 8).contains(&stats.summary_bytes), "{stats:?}");
        assert_holds(&seen, 0..5_000);
        // About 0.4 % of new ids get past it (the bound allows 2 %);
        // without it, each would probe every run.
        let probes = probes_for_new_ids(&seen, 10_000);
        assert!(probes <= 10_000 * stats.runs as u64 / 50, "{probes} probes of {} runs", stats.runs);
        drop(seen);
        let seen = reopen(&dir, &db, 100);
        seen.wait_idle().expect("idle");
        let stats = seen.stats();
        assert_eq!(stats.summarized_runs, stats.runs, "built again at start-up: {stats:?}");
        assert_holds(&seen, 0..5_000);
        let probes = probes_for_new_ids(&seen, 10_000);
        assert!(probes <= 10_000 * stats.runs as u64 / 50, "{probes} probes of {} runs", stats.runs);
    }

    #[test]
    fn a_run_written_before_runs_stored_their_hashes_is_read_and_summarized_from_its_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, seen) = open(&dir, 1_000);
        index(&seen, 0, 1_000);
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        let id = seen.inner.runs.read().list[0].id;
        drop(seen);
        // The run as the former layout had it: blocks, footer, trailer.
        let path = run_file(&dir.path().join("seen"), id);
        let bytes = std::fs::read(&path).expect("read the run");
        let footer_at = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().expect("8 bytes")) as usize;
        let footer = Footer::decode(&bytes[footer_at..bytes.len() - 8]).expect("footer");
        let (hashes_at, count) = footer.hashes.expect("a new run stores its hashes");
        assert_eq!(count, 1_000);
        let mut former = bytes[..hashes_at as usize].to_vec();
        let Footer { fences, filter_descriptor, filter, .. } = footer;
        former.extend(encode(&FooterWithoutHashes { fences, filter_descriptor, filter }));
        former.extend(hashes_at.to_le_bytes());
        std::fs::write(&path, former).expect("rewrite the run");
        let seen = reopen(&dir, &db, 1_000);
        seen.wait_idle().expect("idle");
        assert_eq!(seen.inner.runs.read().list[0].footer.hashes, None);
        assert_eq!(seen.stats().summarized_runs, 1);
        assert_holds(&seen, 0..1_000);
        assert!(probes_for_new_ids(&seen, 10_000) <= 200);
    }

    #[test]
    fn a_summary_that_cannot_be_built_leaves_lookups_whole_and_runs_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 100);
        index(&seen, 0, 300);
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        assert_eq!(seen.stats().summarized_runs, 3);
        // A run's stored hashes cut off (its blocks stay readable), and the
        // summary dropped: building it again fails.
        let run = seen.inner.runs.read().list[0].clone();
        let (hashes_at, _) = run.footer.hashes.expect("stored hashes");
        std::fs::OpenOptions::new()
            .write(true)
            .open(run_file(&seen.inner.dir, run.id))
            .and_then(|file| file.set_len(hashes_at))
            .expect("cut the hashes off");
        seen.inner.runs.write().summary = None;
        summarize(&seen.inner, true);
        assert!(seen.inner.summary_failed.load(Ordering::Relaxed));
        assert_eq!(seen.stats().summarized_runs, 0);
        // Lookups probe every run; runs are still written.
        assert_holds(&seen, 0..300);
        let probes = probes_for_new_ids(&seen, 100);
        assert_eq!(probes, 300, "three runs probed for each new id");
        index(&seen, 300, 400);
        seen.persist().expect("a run is written without the summary");
        seen.wait_idle().expect("idle");
        assert_holds(&seen, 0..400);
        // The four runs merged into one, whose hashes are whole: the end of
        // the compactor's pass built the summary again.
        let stats = seen.stats();
        assert_eq!((stats.runs, stats.summarized_runs), (1, 1), "{stats:?}");
        assert!(!seen.inner.summary_failed.load(Ordering::Relaxed));
    }

    #[test]
    fn the_blocked_bloom_filter_holds_what_it_was_given_and_lets_few_others_by() {
        let filter = BlockedBloom::with_capacity(100_000);
        let hashes: Vec<u64> = (0..100_000u64).map(|n| hash(&n.to_le_bytes())).collect();
        for &hash in &hashes {
            filter.insert(hash);
        }
        assert!(hashes.iter().all(|&hash| filter.contains(hash)));
        let let_by = (100_000..1_100_000u64).filter(|n| filter.contains(hash(&n.to_le_bytes()))).count();
        // At the keys it was sized for: about 0.4 %.
        assert!((1_000..8_000).contains(&let_by), "{let_by} of a million absent hashes let by");
    }

    #[test]
    fn a_run_of_several_mebibytes_is_written_back_in_pieces_and_read_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 10_000);
        let big = |n: u64| format!("{n:0>2000}").into_bytes();
        let batch: Vec<_> = (0..2_000).map(|n| shared(key(n), big(n))).collect();
        seen.insert(0, &batch);
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        let size = std::fs::metadata(run_file(&dir.path().join("seen"), seen.inner.runs.read().list[0].id))
            .expect("a run")
            .len();
        assert!(3 * WRITE_BACK_BYTES < size, "{size} bytes: several pieces");
        for n in 0..2_000 {
            assert_eq!(seen.get(key(n)).expect("get"), Some(big(n)), "record {n}");
        }
    }

    #[test]
    fn a_written_memtables_map_is_emptied_and_taken_by_the_next() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 100);
        let spare = |seen: &SeenIndex| seen.inner.spare.lock().as_ref().map(|map| (map.len(), map.capacity()));
        assert_eq!(spare(&seen), None, "none before a run is written");
        index(&seen, 0, 100);
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        let (records, capacity) = spare(&seen).expect("the written memtable's map is kept");
        assert_eq!(records, 0, "emptied");
        assert!(100 <= capacity, "with its room: {capacity}");
        // The next freeze takes it; what it held is in the run.
        index(&seen, 100, 200);
        assert_eq!(spare(&seen), None, "taken by the memtable frozen at 100 records");
        seen.persist().expect("persist");
        seen.wait_idle().expect("idle");
        assert_holds(&seen, 0..200);
        assert!(spare(&seen).is_some_and(|(records, _)| records == 0));
    }

    #[test]
    fn merging_keeps_every_record_once_and_the_newest_value() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 1_000_000);
        // Four runs of overlapping ranges; the overlap's later records win.
        for (run, (from, to)) in [(0, 300), (200, 500), (400, 700), (650, 1_000)].into_iter().enumerate() {
            let records: Vec<_> = (from..to).map(|n| shared(key(n), format!("run {run}").into_bytes())).collect();
            seen.insert(run as u64, &records);
            seen.persist().expect("persist");
        }
        seen.wait_idle().expect("idle");
        assert_eq!(seen.stats().runs, 1);
        assert_eq!(seen.stats().run_records, 1_000);
        for n in 0..1_000 {
            let run = [(0, 300), (200, 500), (400, 700), (650, 1_000)]
                .iter()
                .rposition(|(from, to)| (*from..*to).contains(&n))
                .expect("in a run");
            assert_eq!(seen.get(key(n)).expect("get"), Some(format!("run {run}").into_bytes()), "record {n}");
        }
        assert_eq!(seen.covered(), Some(3));
        // The inputs' files and descriptions are gone.
        let merged = seen.inner.runs.read().list[0].id;
        assert_eq!(
            seen.inner.tree.iter().keys().map(|key| key.expect("key").to_vec()).collect::<Vec<_>>(),
            vec![meta_key(merged).to_vec()]
        );
        assert_eq!(run_files(&seen.inner.dir), vec![merged]);
    }

    fn run_files(dir: &Path) -> Vec<u64> {
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .expect("list")
            .filter_map(|entry| run_of(&entry.expect("entry").file_name()))
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn start_up_deletes_what_a_crash_left_half_done() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, seen) = open(&dir, 1_000_000);
        index(&seen, 0, 100);
        seen.persist().expect("persist");
        let input = seen.inner.runs.read().list[0].id;
        // A merge that stored its run but had not deleted its input yet,
        // and a run file whose description a crash lost.
        let mut merged = RunWriter::start(&seen.inner).expect("start");
        for n in 0..100 {
            merged.push(&key(n), &value(n)).expect("push");
        }
        let merged = merged.finish(9, vec![input]).expect("finish").0.id;
        let mut lost = RunWriter::start(&seen.inner).expect("start");
        for n in 500..700 {
            lost.push(&key(n), &value(n)).expect("push");
        }
        let lost = lost.finish(10, vec![]).expect("finish").0.id;
        seen.inner.tree.remove(meta_key(lost)).expect("lose the description");
        let runs_dir = seen.inner.dir.clone();
        assert_eq!(run_files(&runs_dir), vec![input, merged, lost]);
        seen.wait_idle().expect("idle");
        drop(seen);
        let seen = reopen(&dir, &db, 1_000_000);
        assert_eq!(seen.stats().runs, 1);
        assert_eq!(seen.inner.runs.read().list[0].id, merged);
        assert_eq!(run_files(&runs_dir), vec![merged]);
        assert_holds(&seen, 0..100);
        assert_eq!(seen.get(key(500)).expect("get"), None);
        assert_eq!(seen.covered(), Some(9));
        // New runs take ids after every one seen.
        index(&seen, 100, 110);
        seen.persist().expect("persist");
        assert_eq!(seen.inner.runs.read().list[0].id, lost + 1);
    }

    #[test]
    fn a_pending_record_is_found_with_its_ticket_until_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 1_000_000);
        seen.hold(seen.prepare(key(1).into(), value(1).into()), 7);
        seen.hold(seen.prepare(key(2).into(), value(2).into()), 8);
        seen.hold(seen.prepare(key(4).into(), value(4).into()), 9);
        assert_eq!(seen.lookup(&key(1)).expect("lookup"), Some((value(1), Some(7))));
        assert_eq!(seen.get(key(1)).expect("get"), None, "not indexed yet");
        assert_eq!(seen.stats().pending_records, 3);
        // Key 4 again, by an entry of a later commit.
        seen.hold(seen.prepare(key(4).into(), value(5).into()), 10);
        // The writer indexes the commit up to ticket 9, then releases; a
        // record it leaves out of the index on purpose is gone once
        // released, and the one held again since stays.
        seen.insert(0, &[shared(key(1), value(1)), shared(key(4), value(4))]);
        seen.release([key(1).as_slice(), key(2).as_slice(), key(3).as_slice(), key(4).as_slice()], 9);
        assert_eq!(seen.lookup(&key(1)).expect("lookup"), Some((value(1), None)));
        assert_eq!(seen.lookup(&key(2)).expect("lookup"), None);
        assert_eq!(seen.lookup(&key(4)).expect("lookup"), Some((value(5), Some(10))));
        assert_eq!(seen.stats().pending_records, 1);
    }

    #[test]
    fn a_failed_run_is_retried_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_db, seen) = open(&dir, 1_000_000);
        let runs = dir.path().join("seen");
        std::fs::remove_dir_all(&runs).expect("remove");
        std::fs::write(&runs, b"not a directory").expect("block the run files");
        index(&seen, 0, 10);
        let error = seen.persist().expect_err("no run can be written");
        assert!(error.to_string().contains("compactor failed"), "{error}");
        assert_holds(&seen, 0..10);
        std::fs::remove_file(&runs).expect("unblock");
        std::fs::create_dir(&runs).expect("unblock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while let Err(error) = seen.persist() {
            assert!(std::time::Instant::now() < deadline, "never retried: {error}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        seen.wait_idle().expect("idle");
        let stats = seen.stats();
        assert_eq!(
            (stats.runs, stats.run_records, stats.memory_records, stats.pending_records, stats.summarized_runs),
            (1, 10, 0, 0, 1),
            "{stats:?}"
        );
        assert_eq!(run_files(&runs).len(), 1);
        assert_holds(&seen, 0..10);
    }

    #[test]
    fn blocks_are_laid_out_as_bincode_lays_out_their_records() {
        let records = [(b"a".as_slice(), b"1".as_slice()), (b"bc", b""), (b"", b"xyz")];
        let mut block = BlockBuilder::new();
        for (key, value) in records {
            block.push(key, value);
        }
        let bytes = block.finish().to_vec();
        let as_bincode: Vec<(&serde_bytes::Bytes, &serde_bytes::Bytes)> =
            records.iter().map(|(key, value)| (serde_bytes::Bytes::new(key), serde_bytes::Bytes::new(value))).collect();
        // The layout is the fixed-width format's of the same pairs.
        let mut fixed_width = vec![crate::storage::FIXED_WIDTH_VERSION];
        fixed_width.extend(bincode::serialize(&as_bincode).expect("serialises"));
        assert_eq!(bytes, fixed_width);
        let parsed = parse_block(&bytes).expect("parse");
        let parsed: Vec<_> = parsed.into_iter().map(|(key, value)| (&bytes[key], &bytes[value])).collect();
        assert_eq!(parsed, records);
        for cut in 0..bytes.len() {
            assert!(parse_block(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut newer = bytes.clone();
        newer[0] = BLOCK_VERSION + 1;
        assert!(parse_block(&newer).expect_err("newer").to_string().contains("upgrade the node"));
    }

    #[test]
    fn the_former_seen_tree_is_still_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join("db")).expect("open");
        db.open_tree("seen").expect("tree").insert(key(1), value(1)).expect("insert");
        let seen = reopen(&dir, &db, 100);
        assert_eq!(seen.get(key(1)).expect("get"), Some(value(1)));
        assert_eq!(seen.get(key(2)).expect("get"), None);
    }
}
