//! The journal's files: a write-ahead log of group commits, in segment
//! files under `journal/` beside sled's.
//!
//! Earlier nodes kept the journal as a sled tree. Under batched load sled
//! wrote about 5.5 KB to disk per event for about 1.5 KB of journal (it
//! logs every value, then rewrites whole leaves as it consolidates and
//! splits them), its I/O threads took about 7 CPU-µs per event, and each
//! commit waited for sled's flush and then for the `fdatasync` that makes
//! it survive power loss. Appending each group commit to a file and
//! syncing that file writes each byte once, with one system call and one
//! `fdatasync` per commit. sled keeps what is not a log: snapshots, the
//! outbox, the audit, definitions, the checkpoint.
//!
//! **Layout.** `journal/<first batch, 16 hex digits>.wal`: a
//! [`HEADER_BYTES`] header (magic, format version), then one record per
//! batch: its payload's length (`u32`), a CRC-32 of the sequence number
//! and the payload (`u32`), the batch's sequence number (`u64`, all
//! little-endian), then the payload (the batch's entries as
//! [`crate::storage::encode`] writes them).
//!
//! **What is a record.** A record counts only if it is whole, its CRC
//! matches and its sequence number is the one after the record before it
//! (the segment's name for the first). Anything else ends the segment: a
//! record cut by a crash, or bytes that were never a record; but only
//! one record is ever being written and not yet synced, so a whole record
//! found after one that is not means the journal is damaged, and reading
//! fails rather than drop the acknowledged batches after it. Every writer
//! starts a segment of its own, named by the first batch it will write, so
//! the segment before it ends where the last writer stopped, cleanly or
//! not, and the next must begin right after: a gap between segments means
//! an acknowledged batch is gone, and reading fails with an error that says
//! so instead of going on without it.
//!
//! **Durability.** [`Appender::sync`] writes the records appended since
//! the last one as whole blocks, with `O_DIRECT | O_DSYNC` into a segment
//! filled with zeros beforehand (or through the page cache and then
//! `fdatasync`, where the file system has no `O_DIRECT`); see
//! [`Appender`]. The first sync of a new segment syncs the directory too,
//! so that its name survives a crash. Nothing here is acknowledged before
//! that. A segment's records are followed by zeros, which end it like a
//! record cut by a crash.
//! [`read_from`] syncs the newest segment before it returns: after
//! `kill -9` its last record may be whole in the page cache but not on
//! disk, and the next writer builds on it.
//!
//! **Trimming.** A segment goes whole, once the next segment begins at or
//! below the checkpoint (every batch in it is covered by snapshots; see
//! [`crate::journal`]) and that checkpoint is durable in sled. While the
//! node serves, its disk space goes back a slice at a time
//! ([`Pace::Spread`]): a segment that a crash left cut short below the
//! checkpoint is never read ([`read_from`] skips every segment the next
//! one starts at or below its start) and goes at the next trim.

use crate::storage::{Pace, StorageError, StorageResult};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The magic bytes a segment starts with, then the format version.
const MAGIC: &[u8; 8] = b"bzjournl";
const VERSION: u32 = 1;

/// A segment's header: magic, version (`u32`), four bytes reserved.
pub const HEADER_BYTES: usize = 16;

/// A record's header: length, CRC, sequence number.
pub const RECORD_HEADER_BYTES: usize = 16;

/// A segment is closed once a record would take it past this many bytes
/// (a record larger than that gets a segment of its own). Thirty seconds
/// (a checkpoint interval) of the batched load generator fill about forty
/// of these; the checkpoint then deletes them, a slice at a time while
/// the node serves ([`trim`]).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The file name of the segment whose first batch is `first`.
fn segment_name(first: u64) -> String {
    format!("{first:016x}.wal")
}

/// The first batch of a segment, from its file name (none for other names).
fn segment_of(name: &std::ffi::OsStr) -> Option<u64> {
    let hex = name.to_str()?.strip_suffix(".wal")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

fn io_error(path: &Path, error: std::io::Error) -> StorageError {
    StorageError::Sync(path.display().to_string(), error)
}

/// The segments in `dir`, by first batch, oldest first.
pub fn segments(dir: &Path) -> StorageResult<Vec<u64>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut firsts = Vec::new();
    for entry in listing {
        if let Some(first) = segment_of(&entry.map_err(|e| io_error(dir, e))?.file_name()) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Makes a record of the payload written into `buffer` after
/// [`begin_record`]: fills in its header.
pub fn seal_record(buffer: &mut [u8], seq: u64) -> StorageResult<()> {
    let payload = buffer.len() - RECORD_HEADER_BYTES;
    let length = u32::try_from(payload)
        .map_err(|_| StorageError::Codec(format!("a journal batch of {payload} bytes is over 4 GiB")))?;
    buffer[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&buffer[8..]);
    buffer[..4].copy_from_slice(&length.to_le_bytes());
    buffer[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Empties `buffer` and leaves room for a record's header: the payload is
/// written after it, then [`seal_record`] fills it in. The batch is
/// encoded straight into the buffer the segment is written from.
pub fn begin_record(buffer: &mut Vec<u8>) {
    buffer.clear();
    buffer.resize(RECORD_HEADER_BYTES, 0);
}

/// The records of one segment read back: the file's bytes and where each
/// batch's payload is in them.
pub struct SegmentRead {
    pub bytes: SegmentBytes,
    pub records: Vec<(u64, Range<usize>)>,
}

/// A segment's bytes, mapped rather than read into a buffer: recovery reads
/// every segment since the checkpoint (1.7 GB for a tail of 3.8 million
/// entries), and on this machine's virtual memory copying them into fresh
/// pages took 3.4 s where mapping the page cache took 0.1 s.
pub enum SegmentBytes {
    Mapped(memmap2::Mmap),
    /// A segment created and cut before its header: nothing in it.
    Empty,
}

impl std::ops::Deref for SegmentBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Empty => &[],
        }
    }
}

/// Reads every batch from `from` on, in order, from the segments in `dir`
/// (see the module doc for what counts as a record). Fails if a batch
/// between `from` and the last one found is missing.
pub fn read_from(dir: &Path, from: u64) -> StorageResult<Vec<SegmentRead>> {
    let firsts = segments(dir)?;
    let mut expected = from;
    let mut read = Vec::new();
    for (at, &first) in firsts.iter().enumerate() {
        // Every batch of this segment is below `from`: the next one
        // begins at or below it.
        if firsts.get(at + 1).is_some_and(|next| *next <= from) {
            continue;
        }
        if expected < first {
            return Err(StorageError::Codec(format!(
                "the journal misses batches {expected} to {} (segment {} begins after them): \
                 acknowledged events may be lost; restore the data directory from a backup",
                first - 1,
                segment_name(first)
            )));
        }
        let path = dir.join(segment_name(first));
        let bytes = read_file(&path)?;
        let mut records: Vec<(u64, Range<usize>)> = valid_records(&bytes, first).collect();
        let end = records.last().map_or(HEADER_BYTES.min(bytes.len()), |(_, range)| range.end);
        if let Some((offset, seq)) = record_after(&bytes, end, first + records.len() as u64) {
            return Err(StorageError::Codec(format!(
                "journal segment {} is damaged at byte {end}, yet a whole record of batch {seq} follows at \
                 byte {offset}: acknowledged events would be lost; restore the data directory from a backup",
                path.display()
            )));
        }
        records.retain(|(seq, _)| from <= *seq);
        if let Some((seq, _)) = records.first() {
            if *seq != expected {
                return Err(StorageError::Codec(format!(
                    "segment {} holds batch {seq} where batch {expected} was due: the journal's segments \
                     overlap or miss batches",
                    path.display()
                )));
            }
        }
        if let Some((last, _)) = records.last() {
            expected = last + 1;
        }
        read.push(SegmentRead { bytes, records });
    }
    if let Some(newest) = firsts.last() {
        // Synced before anything builds on what it holds (the module doc,
        // "Durability"); the older ones were synced before the next began.
        let path = dir.join(segment_name(*newest));
        File::open(&path).and_then(|file| file.sync_data()).map_err(|e| io_error(&path, e))?;
        crate::storage::sync_dir(dir)?;
    }
    Ok(read)
}

/// The first whole record (its offset and batch) found anywhere after
/// `end` in a segment's bytes, for a batch from `expected` on: the sign
/// that what ends the segment's valid records is damage, not a record cut
/// by a crash.
fn record_after(bytes: &[u8], end: usize, expected: u64) -> Option<(usize, u64)> {
    // No record begins in the zeros a prepared segment ends with.
    let last_start = bytes.len().checked_sub(RECORD_HEADER_BYTES)?.min(written_len(bytes));
    (end + 1..=last_start).find_map(|at| {
        let header = &bytes[at..at + RECORD_HEADER_BYTES];
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("eight bytes"));
        // No segment holds more records than it has bytes.
        if seq < expected || expected.saturating_add(bytes.len() as u64) < seq {
            return None;
        }
        let length = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("four bytes"));
        let body = bytes.get(at + 8..(at + RECORD_HEADER_BYTES).checked_add(length)?)?;
        (0 < length && crc32fast::hash(body) == crc).then_some((at, seq))
    })
}

/// The length of `bytes` without the zeros they end with.
fn written_len(bytes: &[u8]) -> usize {
    let mut end = bytes.len();
    // Whole blocks of zeros first, a block at a time (the fold vectorises).
    while BLOCK_BYTES <= end && bytes[end - BLOCK_BYTES..end].iter().fold(0, |any, b| any | b) == 0 {
        end -= BLOCK_BYTES;
    }
    bytes[..end].iter().rposition(|b| *b != 0).map_or(0, |at| at + 1)
}

fn read_file(path: &Path) -> StorageResult<SegmentBytes> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    if file.metadata().map_err(|e| io_error(path, e))?.len() == 0 {
        return Ok(SegmentBytes::Empty);
    }
    // SAFETY: a mapping goes wrong if its file shrinks under it. Segments
    // are only ever written within their prepared length or past it, by
    // the one writer, and deleted whole or replaced by a rename (which
    // leave a mapping of the old file intact). The one that shrinks is a
    // segment a spread-out trim cuts down (`Pace::Spread`), and only once
    // it lies wholly below a durable checkpoint: `read_from` never maps
    // such a segment, and that trim runs on the journal writer's
    // checkpoint thread, which starts after recovery has dropped its
    // mappings.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
    // Read front to back once: written with O_DIRECT, the segment is on
    // the disk and not in the page cache, and larger read-ahead reads it
    // faster. Advice only: a refusal changes nothing else.
    let _ = map.advise(memmap2::Advice::Sequential);
    let bytes = SegmentBytes::Mapped(map);
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        // Created, then cut before its header was synced: nothing in it was
        // ever acknowledged.
        if bytes.iter().all(|b| *b == 0) {
            return Ok(SegmentBytes::Empty);
        }
        return Err(StorageError::Codec(format!("{} is not a journal segment", path.display())));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("four bytes"));
    if VERSION < version {
        return Err(StorageError::Codec(format!(
            "journal segment {} has format version {version}; this build reads up to {VERSION} (upgrade the node)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The whole, intact records of a segment's bytes whose first batch is
/// `first`, in order, up to the first that is not.
fn valid_records(bytes: &[u8], first: u64) -> impl Iterator<Item = (u64, Range<usize>)> + '_ {
    let mut at = HEADER_BYTES.min(bytes.len());
    let mut expected = first;
    std::iter::from_fn(move || {
        let header = bytes.get(at..at + RECORD_HEADER_BYTES)?;
        let length = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("four bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("eight bytes"));
        let payload = at + RECORD_HEADER_BYTES..(at + RECORD_HEADER_BYTES).checked_add(length)?;
        let body = bytes.get(at + 8..payload.end)?;
        if seq != expected || length == 0 || crc32fast::hash(body) != crc {
            return None;
        }
        at = payload.end;
        expected += 1;
        Some((seq, payload))
    })
}

/// Deletes the segments in `dir` whose batches are all below `below`
/// (those whose next segment begins at or below it), at `pace` (the rest
/// at once when `hurry` says so); the newest is never deleted. Returns how
/// many went.
pub fn trim(dir: &Path, below: u64, pace: Pace, hurry: &dyn Fn() -> bool) -> StorageResult<usize> {
    let firsts = segments(dir)?;
    let mut deleted = 0;
    for pair in firsts.windows(2) {
        if below < pair[1] {
            break;
        }
        if crate::storage::remove_file(&dir.join(segment_name(pair[0])), pace, hurry)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Writes reach the disk in whole blocks of this many bytes, at offsets
/// that are multiples of it: what `O_DIRECT` asks of buffers, offsets and
/// lengths on any block device (4 KiB covers every logical block size).
pub const BLOCK_BYTES: usize = 4096;

/// The zeros a segment is prepared with are written this many at a time.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// The buffer commits are staged in starts this large, grows as a commit
/// needs, and is kept up to [`STAGED_KEPT_BYTES`].
const STAGED_BYTES: usize = 1 << 20;
const STAGED_KEPT_BYTES: usize = 16 << 20;

/// A byte buffer whose bytes start at a [`BLOCK_BYTES`] boundary in memory,
/// as `O_DIRECT` writes need.
struct Aligned {
    raw: Vec<u8>,
    /// Where the aligned bytes begin in `raw`.
    start: usize,
    len: usize,
}

impl Aligned {
    fn with_capacity(capacity: usize) -> Self {
        let raw = vec![0u8; capacity + BLOCK_BYTES];
        let start = raw.as_ptr().align_offset(BLOCK_BYTES);
        Self { raw, start, len: 0 }
    }

    fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// Room for `capacity` bytes in all, the bytes so far kept.
    fn reserve(&mut self, capacity: usize) {
        if capacity <= self.capacity() {
            return;
        }
        let mut grown = Self::with_capacity(capacity.max(2 * self.capacity()));
        grown.extend(self.as_slice());
        *self = grown;
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.reserve(self.len + bytes.len());
        let at = self.start + self.len;
        self.raw[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, then zeros up to the next block boundary: what a write
    /// of whole blocks puts on the disk.
    fn padded(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        self.reserve(padded);
        let range = self.start + self.len..self.start + padded;
        self.raw[range].fill(0);
        &self.raw[self.start..self.start + padded]
    }

    /// Drops the first `from` bytes, moving the rest to the front.
    fn keep_from(&mut self, from: usize) {
        let range = self.start + from..self.start + self.len;
        self.raw.copy_within(range, self.start);
        self.len -= from;
    }
}

/// Appends records to the newest segment, opening the next when it is
/// full. One writer at a time: the journal's.
///
/// **Writing.** Where the file system allows it, a segment is opened with
/// `O_DIRECT | O_DSYNC` and filled with zeros before its first record (off
/// the commit's path: a thread prepares the next segment while this one
/// fills): a commit is then one `pwrite` of whole blocks that returns once
/// they are on the disk, with no page-cache copy, no size or extent to
/// record and no separate `fdatasync`. On this machine (`4 KiB` commits)
/// that took half the CPU of a buffered append and `fdatasync` (48 against
/// 96 µs) and came back twice as often (8,300 against 4,000 per second).
/// The block a commit ends in is written again, whole, by the next: its
/// bytes up to there are the same, so a torn rewrite still holds them.
/// Elsewhere (a file system without `O_DIRECT`, such as tmpfs) the same
/// blocks are written through the page cache and `fdatasync`ed.
pub struct Appender {
    dir: PathBuf,
    file: File,
    /// `file`'s path, for errors.
    path: PathBuf,
    /// Records were appended since the last sync.
    unsynced: bool,
    /// Where the next record goes in `file`.
    offset: u64,
    /// The block-aligned offset in `file` that `staged` begins at.
    staged_at: u64,
    /// The file's bytes from `staged_at` to `offset`: the last block's
    /// bytes already durable, then the records appended since.
    staged: Aligned,
    /// The sequence number the next record must carry.
    next_seq: u64,
    /// A segment was created since the last sync: its name is durable
    /// only once the directory is synced.
    created: bool,
    segment_bytes: u64,
    /// Whether segments are written with `O_DIRECT | O_DSYNC`.
    direct: bool,
    /// The next segment, being prepared by a thread of its own.
    next: Option<Preparing>,
}

/// A segment file being filled with zeros, to be renamed when needed.
struct Preparing {
    thread: std::thread::JoinHandle<StorageResult<PathBuf>>,
    cancel: Arc<AtomicBool>,
}

impl Appender {
    /// Starts a segment of its own for batches from `next_seq` on.
    pub fn open(dir: &Path, next_seq: u64) -> StorageResult<Self> {
        Self::open_with(dir, next_seq, SEGMENT_BYTES)
    }

    /// The same, with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, next_seq: u64, segment_bytes: u64) -> StorageResult<Self> {
        Self::open_mode(dir, next_seq, segment_bytes, true)
    }

    /// The same, through the page cache unless `allow_direct` and the file
    /// system supports `O_DIRECT`.
    fn open_mode(dir: &Path, next_seq: u64, segment_bytes: u64, allow_direct: bool) -> StorageResult<Self> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
            // The directory's own name, durable in its parent.
            if let Some(parent) = dir.parent() {
                crate::storage::sync_dir(parent)?;
            }
        }
        remove_prepared(dir)?;
        let direct = allow_direct && supports_direct(dir)?;
        // The first segment is prepared here: a few tens of milliseconds
        // at start-up for 64 MiB.
        let prepared = prepare_segment(dir, segment_bytes, direct, &AtomicBool::new(false))?;
        let mut appender = Self {
            dir: dir.to_path_buf(),
            file: open_segment(&prepared, direct)?,
            path: prepared.clone(),
            unsynced: false,
            offset: 0,
            staged_at: 0,
            staged: Aligned::with_capacity(STAGED_BYTES),
            next_seq,
            created: true,
            segment_bytes,
            direct,
            next: None,
        };
        appender.begin_segment(prepared, next_seq)?;
        Ok(appender)
    }

    /// Whether segments are written with `O_DIRECT | O_DSYNC` (else
    /// through the page cache, then `fdatasync`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Makes `prepared` (a file of zeros) the segment for batches from
    /// `first` on, stages its header, and starts preparing the next.
    fn begin_segment(&mut self, prepared: PathBuf, first: u64) -> StorageResult<()> {
        let path = self.dir.join(segment_name(first));
        // A crash's leftover of the same name held no whole record (the
        // batch it is named by was never acknowledged): replaced.
        std::fs::rename(&prepared, &path).map_err(|e| io_error(&path, e))?;
        self.path = path;
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        self.staged.len = 0;
        self.staged.extend(&header);
        self.staged_at = 0;
        self.offset = HEADER_BYTES as u64;
        self.created = true;
        let (dir, size, direct) = (self.dir.clone(), self.segment_bytes, self.direct);
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("journal-segments".into())
            .spawn(move || {
                crate::background_thread();
                prepare_segment(&dir, size, direct, &cancelled)
            })
            .map_err(|e| StorageError::Unavailable(format!("starting the journal's segment thread: {e}")))?;
        self.next = Some(Preparing { thread, cancel });
        Ok(())
    }

    /// Writes a record sealed for batch `seq` (which must be the next);
    /// durable after [`Appender::sync`].
    pub fn append(&mut self, seq: u64, record: &[u8]) -> StorageResult<()> {
        if seq != self.next_seq {
            return Err(StorageError::Codec(format!("journal batch {seq} appended where {} was due", self.next_seq)));
        }
        let length = record.len() as u64;
        if HEADER_BYTES as u64 != self.offset && self.segment_bytes < self.offset + length {
            // What this segment holds is durable before the next begins.
            self.sync()?;
            let prepared = match self.next.take() {
                Some(next) if next.thread.is_finished() => match next.thread.join() {
                    Ok(Ok(path)) => path,
                    // It costs speed only: the segment grows as it is written.
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not prepare the next journal segment");
                        create_empty(&self.dir)?
                    }
                    Err(_) => create_empty(&self.dir)?,
                },
                // Not ready (the disk is slower than the commits): a new
                // file now, which each write also records the size of.
                // The thread stops between two chunks of zeros.
                not_ready => {
                    if let Some(next) = not_ready {
                        next.cancel.store(true, Ordering::Relaxed);
                        let _ = next.thread.join();
                    }
                    tracing::info!(segment = %segment_name(seq), "the next journal segment was not prepared in time");
                    create_empty(&self.dir)?
                }
            };
            self.file = open_segment(&prepared, self.direct)?;
            self.begin_segment(prepared, seq)?;
        }
        self.staged.extend(record);
        self.unsynced = true;
        self.offset += length;
        self.next_seq += 1;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> StorageResult<()> {
        if !self.unsynced && !self.created {
            return Ok(());
        }
        let end = (self.offset - self.staged_at) as usize;
        self.file.write_all_at(self.staged.padded(), self.staged_at).map_err(|e| io_error(&self.path, e))?;
        if !self.direct {
            self.file.sync_data().map_err(|e| io_error(&self.path, e))?;
        }
        self.unsynced = false;
        if self.created {
            crate::storage::sync_dir(&self.dir)?;
            self.created = false;
        }
        // The last block, unless full, is written again with the next
        // records.
        let whole = end / BLOCK_BYTES * BLOCK_BYTES;
        self.staged.len = end;
        self.staged.keep_from(whole);
        self.staged_at += whole as u64;
        if STAGED_KEPT_BYTES < self.staged.capacity() {
            // One very large commit does not keep its buffer for good.
            let mut smaller = Aligned::with_capacity(STAGED_BYTES);
            smaller.extend(self.staged.as_slice());
            self.staged = smaller;
        }
        Ok(())
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        if let Some(next) = self.next.take() {
            next.cancel.store(true, Ordering::Relaxed);
            let _ = next.thread.join();
        }
        let _ = remove_prepared(&self.dir);
    }
}

/// The suffix of a segment being prepared (not a segment until renamed).
const PREPARED_SUFFIX: &str = ".prepared";

/// Deletes the segments a writer prepared and did not use.
fn remove_prepared(dir: &Path) -> StorageResult<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        if path.to_str().is_some_and(|name| name.ends_with(PREPARED_SUFFIX)) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
        }
    }
    Ok(())
}

/// A fresh, empty file for the next segment, when none is prepared.
fn create_empty(dir: &Path) -> StorageResult<PathBuf> {
    let path = dir.join(format!("{:016x}{PREPARED_SUFFIX}", rand::random::<u64>()));
    File::create(&path).map_err(|e| io_error(&path, e))?;
    Ok(path)
}

/// Whether files in `dir` can be opened with `O_DIRECT`.
fn supports_direct(dir: &Path) -> StorageResult<bool> {
    let path = create_empty(dir)?;
    let direct = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path);
    std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
    match direct {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(io_error(&path, e)),
    }
}

fn open_segment(path: &Path, direct: bool) -> StorageResult<File> {
    let flags = if direct { libc::O_DIRECT | libc::O_DSYNC } else { 0 };
    std::fs::OpenOptions::new().write(true).custom_flags(flags).open(path).map_err(|e| io_error(path, e))
}

/// A file of `segment_bytes` (rounded up to whole blocks) of zeros, synced,
/// under a temporary name: a segment's blocks allocated and written before
/// any record is, so that writing a record changes no metadata. Gives up
/// (with an error nobody reads) once `cancel` is set.
fn prepare_segment(dir: &Path, segment_bytes: u64, direct: bool, cancel: &AtomicBool) -> StorageResult<PathBuf> {
    let path = create_empty(dir)?;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let file =
        std::fs::OpenOptions::new().write(true).custom_flags(flags).open(&path).map_err(|e| io_error(&path, e))?;
    let size = segment_bytes.div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64;
    let mut zeros = Aligned::with_capacity(ZERO_CHUNK_BYTES);
    zeros.len = ZERO_CHUNK_BYTES;
    let mut at = 0;
    while at < size {
        if cancel.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(&path);
            return Err(StorageError::Unavailable("preparing a journal segment: cancelled".into()));
        }
        let chunk = (size - at).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros.as_slice()[..chunk], at).map_err(|e| io_error(&path, e))?;
        at += chunk as u64;
    }
    file.sync_all().map_err(|e| io_error(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut buffer = Vec::new();
        begin_record(&mut buffer);
        buffer.extend_from_slice(payload);
        seal_record(&mut buffer, seq).expect("sealed");
        buffer
    }

    fn append(appender: &mut Appender, seqs: Range<u64>) {
        for seq in seqs {
            appender.append(seq, &record(seq, &payload(seq))).expect("append");
        }
        appender.sync().expect("sync");
    }

    /// Segments this small rotate; tests that do not rotate need no more.
    const TEST_SEGMENT: u64 = 64 << 10;

    /// Where batch `seq`'s record begins in a segment whose first is 0.
    fn end_of(seq: u64) -> usize {
        HEADER_BYTES + (0..seq).map(|seq| RECORD_HEADER_BYTES + payload(seq).len()).sum::<usize>()
    }

    fn payload(seq: u64) -> Vec<u8> {
        vec![seq as u8; 10 + (seq as usize % 7) * 100]
    }

    /// The batches read from `from` on, with their payloads checked.
    fn read(dir: &Path, from: u64) -> StorageResult<Vec<u64>> {
        let mut seqs = Vec::new();
        for segment in read_from(dir, from)? {
            for (seq, range) in segment.records {
                assert_eq!(segment.bytes[range], payload(seq)[..], "batch {seq}");
                seqs.push(seq);
            }
        }
        Ok(seqs)
    }

    #[test]
    fn batches_are_read_back_across_segments_and_writers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 5, 2_000).expect("open");
        append(&mut appender, 5..40);
        assert!(5 < segments(dir.path()).expect("list").len(), "small segments rotate");
        drop(appender);
        // The next writer (a restart) begins a segment of its own.
        let mut appender = Appender::open_with(dir.path(), 40, 2_000).expect("open");
        append(&mut appender, 40..45);
        assert_eq!(read(dir.path(), 5).expect("read"), (5..45).collect::<Vec<_>>());
        assert_eq!(read(dir.path(), 30).expect("read"), (30..45).collect::<Vec<_>>());
        assert_eq!(read(dir.path(), 45).expect("read"), Vec::<u64>::new());
        // Trimming keeps every segment that holds a batch from 30 on.
        assert!(0 < trim(dir.path(), 30, Pace::AtOnce, &|| false).expect("trim"));
        assert_eq!(read(dir.path(), 30).expect("read"), (30..45).collect::<Vec<_>>());
        assert!(read(dir.path(), 5).is_err(), "batches 5.. are gone");
        // The newest segment stays, whatever the checkpoint.
        trim(dir.path(), u64::MAX, Pace::AtOnce, &|| false).expect("trim");
        assert_eq!(segments(dir.path()).expect("list"), vec![40]);
    }

    #[test]
    fn a_spread_trim_deletes_what_an_immediate_one_does_and_a_crash_midway_harms_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 5, 2_000).expect("open");
        append(&mut appender, 5..60);
        drop(appender);
        let before = segments(dir.path()).expect("list");
        let kept: Vec<u64> = before
            .iter()
            .enumerate()
            .filter(|(at, _)| before.get(at + 1).is_none_or(|next| 30 < *next))
            .map(|(_, first)| *first)
            .collect();
        assert!(3 < before.len() - kept.len(), "several segments lie below batch 30");
        // A spread trim that a crash stopped midway: one segment below the
        // checkpoint cut short, another cut to nothing.
        for (first, length) in [(before[0], 100), (before[1], 0)] {
            let path = dir.path().join(segment_name(first));
            std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(length).expect("cut");
        }
        assert_eq!(read(dir.path(), 30).expect("read past the cut segments"), (30..60).collect::<Vec<_>>());
        assert_eq!(trim(dir.path(), 30, Pace::Spread, &|| false).expect("trim"), before.len() - kept.len());
        assert_eq!(segments(dir.path()).expect("list"), kept, "the same segments stay as with an immediate trim");
        assert_eq!(read(dir.path(), 30).expect("read"), (30..60).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_cut_by_a_crash_ends_its_segment_and_the_next_writer_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 0, TEST_SEGMENT).expect("open");
        append(&mut appender, 0..10);
        let path = dir.path().join(segment_name(0));
        let whole = end_of(10) as u64;
        // Batch 10 half written, or written whole with a bit flipped.
        let cut = record(10, &payload(10));
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&cut[..cut.len() - 3], whole).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..10).collect::<Vec<_>>());
        let mut flipped = cut.clone();
        flipped[RECORD_HEADER_BYTES + 2] ^= 1;
        file.write_all_at(&flipped, whole).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..10).collect::<Vec<_>>());
        // A stale record of another batch where batch 10 was due.
        file.write_all_at(&record(3, &payload(3)), whole).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..10).collect::<Vec<_>>());
        // The restarted writer begins at batch 10, in a segment of its own.
        let mut appender = Appender::open_with(dir.path(), 10, TEST_SEGMENT).expect("open");
        append(&mut appender, 10..12);
        assert_eq!(read(dir.path(), 0).expect("read"), (0..12).collect::<Vec<_>>());
        // A segment created, then cut before its header: nothing in it.
        std::fs::write(dir.path().join(segment_name(12)), [0u8; 5]).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn damage_with_whole_records_after_it_is_an_error_not_a_torn_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 0, TEST_SEGMENT).expect("open");
        append(&mut appender, 0..10);
        let path = dir.path().join(segment_name(0));
        let mut bytes = std::fs::read(&path).expect("read");
        let whole = end_of(10);
        assert!(bytes[whole..].iter().all(|b| *b == 0), "a segment's records are followed by zeros");
        // More zeros after the last record (a file extended, its data never
        // written) are a torn end like any other.
        bytes.truncate(whole);
        bytes.extend([0u8; 300]);
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..10).collect::<Vec<_>>());
        let at = end_of;
        // A bit flipped in batch 4: batches 5 to 9 are whole after it.
        let fourth = at(4);
        bytes[fourth + RECORD_HEADER_BYTES + 1] ^= 1;
        std::fs::write(&path, &bytes[..whole]).expect("write");
        let error = read(dir.path(), 0).expect_err("damage").to_string();
        assert!(error.contains(&format!("damaged at byte {fourth}")) && error.contains("batch 5"), "{error}");
        // Damage in the last record only is a record cut by a crash.
        let last = at(9);
        bytes[fourth + RECORD_HEADER_BYTES + 1] ^= 1;
        bytes[last + RECORD_HEADER_BYTES + 1] ^= 1;
        std::fs::write(&path, &bytes[..whole]).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn a_missing_batch_is_an_error_not_a_shorter_journal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 0, TEST_SEGMENT).expect("open");
        append(&mut appender, 0..10);
        // A writer that began at 12: batches 10 and 11 are nowhere.
        let mut appender = Appender::open_with(dir.path(), 12, TEST_SEGMENT).expect("open");
        append(&mut appender, 12..14);
        let error = read(dir.path(), 0).expect_err("a gap").to_string();
        assert!(error.contains("misses batches 10 to 11"), "{error}");
        // Below the checkpoint nothing is needed: batches from 20 on are
        // none, not an error.
        assert_eq!(read(dir.path(), 20).expect("read"), Vec::<u64>::new());
        // A segment that holds a batch other than the one due.
        let mut appender = Appender::open_with(dir.path(), 16, TEST_SEGMENT).expect("open");
        append(&mut appender, 16..17);
        let error = read(dir.path(), 13).map(|_| ()).expect_err("14 and 15 missing").to_string();
        assert!(error.contains("misses batches 14 to 15"), "{error}");
        // Other files are not segments; a damaged header is refused.
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        std::fs::write(dir.path().join(segment_name(17)), b"not a segment at all").expect("write");
        assert!(read(dir.path(), 16).expect_err("bad header").to_string().contains("not a journal segment"));
    }

    #[test]
    fn blocks_written_again_keep_every_record_with_or_without_the_page_cache() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut appender = Appender::open_mode(dir.path(), 0, 64 << 10, direct).expect("open");
            // Where the file system has O_DIRECT (Linux's ext4, xfs, btrfs).
            assert_eq!(appender.is_direct(), direct && supports_direct(dir.path()).expect("probe"));
            // Records smaller and larger than a block, synced one by one and
            // in twos, so that commits end inside blocks, on their
            // boundaries and across several, and segments rotate.
            let sizes = [1, 4_079, 4_080, 13, 9_000, 4_096, 700, 1, 40_000, 5_000, 20_000];
            let mut records: Vec<Vec<u8>> =
                (0..60u64).map(|seq| vec![(seq % 251) as u8 + 1; sizes[seq as usize % sizes.len()]]).collect();
            // A record larger than a segment, and than the staging buffer
            // keeps, then small ones again.
            records.push(vec![7; STAGED_KEPT_BYTES + 5]);
            records.extend((0..5).map(|n| vec![9; 100 + n]));
            for (seq, payload) in records.iter().enumerate() {
                appender.append(seq as u64, &record(seq as u64, payload)).expect("append");
                if seq % 3 != 1 {
                    appender.sync().expect("sync");
                }
            }
            appender.sync().expect("sync");
            let written = read_from(dir.path(), 0).expect("read");
            assert!(3 < written.len(), "segments rotate");
            let read: Vec<(u64, Vec<u8>)> = written
                .iter()
                .flat_map(|segment| {
                    segment.records.iter().map(|(seq, range)| (*seq, segment.bytes[range.clone()].to_vec()))
                })
                .collect();
            assert_eq!(
                read,
                records.into_iter().enumerate().map(|(seq, payload)| (seq as u64, payload)).collect::<Vec<_>>()
            );
            // The first segment was prepared at open, full size; the others
            // too unless their thread was late (then they grew as written).
            for first in segments(dir.path()).expect("list") {
                let len = std::fs::metadata(dir.path().join(segment_name(first))).expect("stat").len();
                assert_eq!(len % BLOCK_BYTES as u64, 0, "segment {first} is whole blocks");
                assert!(first != 0 || (64 << 10) <= len, "segment {first}: {len} bytes");
            }
            drop(appender);
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .expect("list")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(PREPARED_SUFFIX))
                .collect();
            assert!(left.is_empty(), "a closed appender leaves no prepared segment: {left:?}");
        }
    }

    #[test]
    fn an_appender_refuses_batches_out_of_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open_with(dir.path(), 3, TEST_SEGMENT).expect("open");
        assert!(appender.append(4, &record(4, b"x")).is_err());
        appender.append(3, &record(3, b"x")).expect("in order");
    }
}
