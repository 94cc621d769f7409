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
//! **Durability.** [`Appender::sync`] is one `fdatasync` of the segment;
//! the first sync of a new segment syncs the directory too, so that its
//! name survives a crash. Nothing here is acknowledged before that.
//! [`read_from`] syncs the newest segment before it returns: after
//! `kill -9` its last record may be whole in the page cache but not on
//! disk, and the next writer builds on it.
//!
//! **Trimming.** A segment goes whole, once the next segment begins at or
//! below the checkpoint (every batch in it is covered by snapshots; see
//! [`crate::journal`]) and that checkpoint is durable in sled.

use crate::storage::{StorageError, StorageResult};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
/// of these; the checkpoint then deletes them with a few `unlink`s.
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
    let last_start = bytes.len().checked_sub(RECORD_HEADER_BYTES)?;
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

fn read_file(path: &Path) -> StorageResult<SegmentBytes> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    if file.metadata().map_err(|e| io_error(path, e))?.len() == 0 {
        return Ok(SegmentBytes::Empty);
    }
    // SAFETY: a mapping goes wrong if its file shrinks under it. Segments
    // are only ever appended to, by the one writer, and deleted whole
    // (which leaves a mapping intact). The only truncation is of a segment
    // a writer creates, named by the batch after the last whole one: a
    // crash's leftover at most, which recovery reads (and unmaps) before
    // the node's writer starts.
    let bytes = SegmentBytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(path, e))?);
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
/// (those whose next segment begins at or below it); the newest is never
/// deleted. Returns how many went.
pub fn trim(dir: &Path, below: u64) -> StorageResult<usize> {
    let firsts = segments(dir)?;
    let mut deleted = 0;
    for pair in firsts.windows(2) {
        if below < pair[1] {
            break;
        }
        let path = dir.join(segment_name(pair[0]));
        match std::fs::remove_file(&path) {
            Ok(()) => deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, e)),
        }
    }
    Ok(deleted)
}

/// Appends records to the newest segment, opening the next when it is
/// full. One writer at a time: the journal's.
pub struct Appender {
    dir: PathBuf,
    file: File,
    /// Where the next record goes in `file`.
    offset: u64,
    /// The sequence number the next record must carry.
    next_seq: u64,
    /// A segment was created since the last sync: its name is durable
    /// only once the directory is synced.
    created: bool,
    segment_bytes: u64,
}

impl Appender {
    /// Starts a segment of its own for batches from `next_seq` on.
    pub fn open(dir: &Path, next_seq: u64) -> StorageResult<Self> {
        Self::open_with(dir, next_seq, SEGMENT_BYTES)
    }

    /// The same, with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, next_seq: u64, segment_bytes: u64) -> StorageResult<Self> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
            // The directory's own name, durable in its parent.
            if let Some(parent) = dir.parent() {
                crate::storage::sync_dir(parent)?;
            }
        }
        let file = create_segment(dir, next_seq)?;
        Ok(Self { dir: dir.to_path_buf(), file, offset: HEADER_BYTES as u64, next_seq, created: true, segment_bytes })
    }

    /// Writes a record sealed for batch `seq` (which must be the next);
    /// durable after [`Appender::sync`].
    pub fn append(&mut self, seq: u64, record: &[u8]) -> StorageResult<()> {
        if seq != self.next_seq {
            return Err(StorageError::Codec(format!("journal batch {seq} appended where {} was due", self.next_seq)));
        }
        let length = record.len() as u64;
        if HEADER_BYTES as u64 != self.offset && self.segment_bytes < self.offset + length {
            // The full segment's records were synced with their commits.
            self.file = create_segment(&self.dir, seq)?;
            self.offset = HEADER_BYTES as u64;
            self.created = true;
        }
        let path = || self.dir.join(segment_name(seq));
        self.file.write_all_at(record, self.offset).map_err(|e| io_error(&path(), e))?;
        self.offset += length;
        self.next_seq += 1;
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> StorageResult<()> {
        self.file.sync_data().map_err(|e| io_error(&self.dir, e))?;
        if self.created {
            crate::storage::sync_dir(&self.dir)?;
            self.created = false;
        }
        Ok(())
    }
}

/// Creates (or empties: a crash may have left it without a whole record)
/// the segment for batches from `first` on, with its header.
fn create_segment(dir: &Path, first: u64) -> StorageResult<File> {
    let path = dir.join(segment_name(first));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    file.write_all_at(&header, 0).map_err(|e| io_error(&path, e))?;
    Ok(file)
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
        assert!(0 < trim(dir.path(), 30).expect("trim"));
        assert_eq!(read(dir.path(), 30).expect("read"), (30..45).collect::<Vec<_>>());
        assert!(read(dir.path(), 5).is_err(), "batches 5.. are gone");
        // The newest segment stays, whatever the checkpoint.
        trim(dir.path(), u64::MAX).expect("trim");
        assert_eq!(segments(dir.path()).expect("list"), vec![40]);
    }

    #[test]
    fn a_record_cut_by_a_crash_ends_its_segment_and_the_next_writer_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open(dir.path(), 0).expect("open");
        append(&mut appender, 0..10);
        let path = dir.path().join(segment_name(0));
        let whole = std::fs::metadata(&path).expect("stat").len();
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
        let mut appender = Appender::open(dir.path(), 10).expect("open");
        append(&mut appender, 10..12);
        assert_eq!(read(dir.path(), 0).expect("read"), (0..12).collect::<Vec<_>>());
        // A segment created, then cut before its header: nothing in it.
        std::fs::write(dir.path().join(segment_name(12)), [0u8; 5]).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn damage_with_whole_records_after_it_is_an_error_not_a_torn_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open(dir.path(), 0).expect("open");
        append(&mut appender, 0..10);
        let path = dir.path().join(segment_name(0));
        let mut bytes = std::fs::read(&path).expect("read");
        let whole = bytes.len();
        // Zeros after the last record (a file extended, its data never
        // written) are a torn end like any other.
        bytes.extend([0u8; 300]);
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(read(dir.path(), 0).expect("read"), (0..10).collect::<Vec<_>>());
        // Where batch `seq`'s record begins.
        let at = |seq: u64| HEADER_BYTES + (0..seq).map(|seq| RECORD_HEADER_BYTES + payload(seq).len()).sum::<usize>();
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
        let mut appender = Appender::open(dir.path(), 0).expect("open");
        append(&mut appender, 0..10);
        // A writer that began at 12: batches 10 and 11 are nowhere.
        let mut appender = Appender::open(dir.path(), 12).expect("open");
        append(&mut appender, 12..14);
        let error = read(dir.path(), 0).expect_err("a gap").to_string();
        assert!(error.contains("misses batches 10 to 11"), "{error}");
        // Below the checkpoint nothing is needed: batches from 20 on are
        // none, not an error.
        assert_eq!(read(dir.path(), 20).expect("read"), Vec::<u64>::new());
        // A segment that holds a batch other than the one due.
        let mut appender = Appender::open(dir.path(), 16).expect("open");
        append(&mut appender, 16..17);
        let error = read(dir.path(), 13).map(|_| ()).expect_err("14 and 15 missing").to_string();
        assert!(error.contains("misses batches 14 to 15"), "{error}");
        // Other files are not segments; a damaged header is refused.
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        std::fs::write(dir.path().join(segment_name(17)), b"not a segment at all").expect("write");
        assert!(read(dir.path(), 16).expect_err("bad header").to_string().contains("not a journal segment"));
    }

    #[test]
    fn an_appender_refuses_batches_out_of_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut appender = Appender::open(dir.path(), 3).expect("open");
        assert!(appender.append(4, &record(4, b"x")).is_err());
        appender.append(3, &record(3, b"x")).expect("in order");
    }
}
