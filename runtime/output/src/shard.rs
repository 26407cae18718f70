//! Shard files: the durable unit of progress.
//!
//! Why a custom binary format and not small HDF5 files: a shard is written once, read once
//! sequentially by the merge and must be verifiable after a crash. A flat little-endian record
//! stream with a CRC-32 over the payload does all three at disk speed, with no library state to
//! corrupt, and lets the merge stream records without a second index. HDF5 is only the final format.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header, 48 bytes
//!   0..8    magic  b"VNUCSHD3"
//!   8..12   hidden size H (u32)
//!   12      element type: 0 = f32, 1 = f16
//!   13      per-token states present: 0 | 1
//!   14..16  zero
//!   16..24  records (u64)
//!   24..32  token rows (u64, sum of residues when per-token, else 0)
//!   32..40  payload length in bytes (u64)
//!   40..44  CRC-32 of the payload
//!   44..48  CRC-32 of bytes 0..44
//! payload: records sorted by index, each
//!   index u64 | input record u64 | residues u32 | id length u32 | input digest u64 | id (UTF-8)
//!   | mean [H] | token states [residues, H]
//! ```
//!
//! The input digest is [`virnuc_core::sequence_digest`] of the sequence the row was computed from;
//! the journal line of a shard holds [`combine`] over its records, so a resume can check that it
//! re-reads the same input without keeping per-sequence state.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{OutputDtype, OutputError};

pub(crate) const MAGIC: &[u8; 8] = b"VNUCSHD3";
pub(crate) const HEADER_LEN: u64 = 48;
/// Fixed part of a record before the id.
const RECORD_HEAD: usize = 32;

/// One record's contribution to its shard's digest: order-independent (a wrapping sum of mixed
/// terms), since packs reach a shard in any order.
pub(crate) fn combine(sum: u64, index: u64, digest: u64) -> u64 {
    sum.wrapping_add(crate::synthetic::splitmix64(
        digest ^ crate::synthetic::splitmix64(index),
    ))
}

/// What every shard of one output shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub hidden: usize,
    pub dtype: OutputDtype,
    pub per_token: bool,
}

impl Layout {
    pub fn elem_size(&self) -> usize {
        match self.dtype {
            OutputDtype::F32 => 4,
            OutputDtype::F16 => 2,
        }
    }

    /// Bytes of one row of H values.
    pub fn row_bytes(&self) -> usize {
        self.hidden * self.elem_size()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub layout: Layout,
    pub records: u64,
    pub token_rows: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&(self.layout.hidden as u32).to_le_bytes());
        b[12] = match self.layout.dtype {
            OutputDtype::F32 => 0,
            OutputDtype::F16 => 1,
        };
        b[13] = u8::from(self.layout.per_token);
        b[16..24].copy_from_slice(&self.records.to_le_bytes());
        b[24..32].copy_from_slice(&self.token_rows.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<Self, String> {
        if &b[0..8] != MAGIC {
            return Err("not a virnuc-output shard (bad magic)".into());
        }
        let stored = u32::from_le_bytes([b[44], b[45], b[46], b[47]]);
        if crc32fast::hash(&b[0..44]) != stored {
            return Err("header checksum mismatch".into());
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let dtype = match b[12] {
            0 => OutputDtype::F32,
            1 => OutputDtype::F16,
            other => return Err(format!("unknown element type {other}")),
        };
        Ok(Self {
            layout: Layout {
                hidden: u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize,
                dtype,
                per_token: b[13] != 0,
            },
            records: u64_at(16),
            token_rows: u64_at(24),
            payload_len: u64_at(32),
            payload_crc: u32::from_le_bytes([b[40], b[41], b[42], b[43]]),
        })
    }
}

/// Records buffered in memory until the next flush, in arrival order; sorted when written.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    data: Vec<u8>,
    /// (index, byte offset, byte length) of each record in `data`.
    records: Vec<(u64, usize, usize)>,
    token_rows: u64,
    /// [`combine`] over the records so far.
    digest: u64,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The shard digest of the buffered records.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Appends one record (`seq`'s index, record, residues and id, with its input `digest`); `mean`
    /// and `tokens` are already encoded little-endian in the output dtype.
    pub fn push(
        &mut self,
        seq: &virnuc_core::SequenceMeta,
        digest: u64,
        mean: &[u8],
        tokens: Option<&[u8]>,
    ) {
        let (index, record, residues, id) = (seq.index, seq.record, seq.residues, seq.id.as_str());
        let start = self.data.len();
        self.data.extend_from_slice(&index.to_le_bytes());
        self.data.extend_from_slice(&record.to_le_bytes());
        self.data.extend_from_slice(&residues.to_le_bytes());
        self.data
            .extend_from_slice(&(id.len() as u32).to_le_bytes());
        self.data.extend_from_slice(&digest.to_le_bytes());
        self.data.extend_from_slice(id.as_bytes());
        self.digest = combine(self.digest, index, digest);
        self.data.extend_from_slice(mean);
        if let Some(tokens) = tokens {
            self.data.extend_from_slice(tokens);
            self.token_rows += u64::from(residues);
        }
        self.records.push((index, start, self.data.len() - start));
    }

    /// Writes the records sorted by index to `path` (created, fsynced) and empties the buffer.
    pub fn write_to(&mut self, path: &Path, layout: Layout) -> Result<Header, OutputError> {
        self.records.sort_unstable_by_key(|r| r.0);
        let mut crc = crc32fast::Hasher::new();
        for &(_, at, len) in &self.records {
            crc.update(&self.data[at..at + len]);
        }
        let header = Header {
            layout,
            records: self.records.len() as u64,
            token_rows: self.token_rows,
            payload_len: self.data.len() as u64,
            payload_crc: crc.finalize(),
        };
        let io = |source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header.encode()).map_err(io)?;
        for &(_, at, len) in &self.records {
            out.write_all(&self.data[at..at + len]).map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        self.data.clear();
        self.records.clear();
        self.token_rows = 0;
        self.digest = 0;
        Ok(header)
    }
}

/// The fixed part of a record, read before its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordHead {
    pub index: u64,
    /// Input position of the sequence's record ([`virnuc_core::SequenceMeta::record`]).
    pub record: u64,
    pub residues: u32,
    pub id: String,
    /// Input digest of the sequence ([`virnuc_core::sequence_digest`]).
    pub digest: u64,
}

/// Streams a shard's records in order, checking the payload CRC at the end ([`ShardReader::finish`]).
#[derive(Debug)]
pub(crate) struct ShardReader {
    path: PathBuf,
    reader: BufReader<File>,
    pub header: Header,
    crc: crc32fast::Hasher,
    records_left: u64,
    bytes_left: u64,
    /// Payload bytes of the current record not read yet.
    payload_left: usize,
}

impl ShardReader {
    /// Opens and checks the header: magic, header CRC, layout, and that the file is exactly as long
    /// as the header says (a torn write is caught here, before any record is read).
    pub fn open(path: &Path, layout: Layout, buffer: usize) -> Result<Self, OutputError> {
        let corrupt = |message: String| OutputError::CorruptShard {
            path: path.to_path_buf(),
            message,
        };
        let io = |source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut b = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut b)
            .map_err(|e| corrupt(format!("cannot read header: {e}")))?;
        let header = Header::decode(&b).map_err(corrupt)?;
        if header.layout != layout {
            return Err(corrupt(format!(
                "layout {:?} differs from the output's {:?}",
                header.layout, layout
            )));
        }
        if file_len != HEADER_LEN + header.payload_len {
            return Err(corrupt(format!(
                "file is {file_len} bytes, header says {}",
                HEADER_LEN + header.payload_len
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(buffer, file),
            crc: crc32fast::Hasher::new(),
            records_left: header.records,
            bytes_left: header.payload_len,
            payload_left: 0,
            header,
        })
    }

    fn corrupt(&self, message: String) -> OutputError {
        OutputError::CorruptShard {
            path: self.path.clone(),
            message,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), OutputError> {
        if buf.len() as u64 > self.bytes_left {
            return Err(self.corrupt("record runs past the payload".into()));
        }
        if let Err(e) = self.reader.read_exact(buf) {
            return Err(self.corrupt(format!("cannot read record: {e}")));
        }
        self.crc.update(buf);
        self.bytes_left -= buf.len() as u64;
        Ok(())
    }

    /// Reads the next record's head, or `None` after the last; the previous record's payload must
    /// have been consumed ([`ShardReader::read_payload`] or [`ShardReader::skip_payload`]).
    pub fn next_record(&mut self) -> Result<Option<RecordHead>, OutputError> {
        debug_assert_eq!(self.payload_left, 0, "payload not consumed");
        if self.records_left == 0 {
            return Ok(None);
        }
        let mut fixed = [0u8; RECORD_HEAD];
        self.read_exact(&mut fixed)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(&fixed[0..8]);
        let index = u64::from_le_bytes(x);
        x.copy_from_slice(&fixed[8..16]);
        let record = u64::from_le_bytes(x);
        let residues = u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]);
        let id_len = u32::from_le_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]) as usize;
        x.copy_from_slice(&fixed[24..32]);
        let digest = u64::from_le_bytes(x);
        let mut id = vec![0u8; id_len];
        self.read_exact(&mut id)?;
        let id = String::from_utf8(id)
            .map_err(|_| self.corrupt(format!("record {index}: id is not UTF-8")))?;
        let layout = self.header.layout;
        let rows = 1 + if layout.per_token {
            residues as usize
        } else {
            0
        };
        self.payload_left = rows * layout.row_bytes();
        self.records_left -= 1;
        Ok(Some(RecordHead {
            index,
            record,
            residues,
            id,
            digest,
        }))
    }

    /// Reads the current record's mean row into `mean` and its token rows into `tokens` (both sized
    /// by the caller from the head).
    pub fn read_payload(&mut self, mean: &mut [u8], tokens: &mut [u8]) -> Result<(), OutputError> {
        if mean.len() + tokens.len() != self.payload_left {
            return Err(self.corrupt("record payload size mismatch".into()));
        }
        self.read_exact(mean)?;
        self.read_exact(tokens)?;
        self.payload_left = 0;
        Ok(())
    }

    /// Consumes the current record's payload (still checksummed) without keeping it.
    pub fn skip_payload(&mut self, scratch: &mut Vec<u8>) -> Result<(), OutputError> {
        let mut left = self.payload_left;
        scratch.resize(64 << 10, 0);
        while left > 0 {
            let n = left.min(scratch.len());
            let mut chunk = std::mem::take(scratch);
            let r = self.read_exact(&mut chunk[..n]);
            *scratch = chunk;
            r?;
            left -= n;
        }
        self.payload_left = 0;
        Ok(())
    }

    /// Copies the current record's payload to `out` in bounded pieces.
    pub fn copy_payload(
        &mut self,
        out: &mut impl Write,
        scratch: &mut Vec<u8>,
        out_path: &Path,
    ) -> Result<(), OutputError> {
        let mut left = self.payload_left;
        scratch.resize(64 << 10, 0);
        while left > 0 {
            let n = left.min(scratch.len());
            let mut chunk = std::mem::take(scratch);
            let r = self.read_exact(&mut chunk[..n]).and_then(|()| {
                out.write_all(&chunk[..n])
                    .map_err(|source| OutputError::Io {
                        path: out_path.to_path_buf(),
                        source,
                    })
            });
            *scratch = chunk;
            r?;
            left -= n;
        }
        self.payload_left = 0;
        Ok(())
    }

    /// After the last record: checks that the payload was consumed exactly and its CRC matches.
    pub fn finish(self) -> Result<(), OutputError> {
        if self.records_left != 0 || self.bytes_left != 0 {
            return Err(self.corrupt(format!(
                "{} records and {} bytes left unread",
                self.records_left, self.bytes_left
            )));
        }
        if self.crc.clone().finalize() != self.header.payload_crc {
            return Err(self.corrupt("payload checksum mismatch".into()));
        }
        Ok(())
    }

    /// Reads every record, checking the checksum; calls `each` with each head.
    pub fn scan(mut self, mut each: impl FnMut(&RecordHead)) -> Result<Header, OutputError> {
        let mut scratch = Vec::new();
        while let Some(head) = self.next_record()? {
            each(&head);
            self.skip_payload(&mut scratch)?;
        }
        let header = self.header;
        self.finish()?;
        Ok(header)
    }
}

/// Writes a shard record by record when the records are produced in index order (intermediate
/// merge runs): header placeholder first, patched when done.
#[derive(Debug)]
pub(crate) struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    layout: Layout,
    records: u64,
    token_rows: u64,
    payload_len: u64,
}

/// `Write` adapter that checksums and counts what passes through.
struct Counting<'a> {
    inner: &'a mut BufWriter<File>,
    crc: &'a mut crc32fast::Hasher,
    len: &'a mut u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        *self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl StreamWriter {
    pub fn create(path: &Path, layout: Layout) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        out.write_all(&[0u8; HEADER_LEN as usize]).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            crc: crc32fast::Hasher::new(),
            layout,
            records: 0,
            token_rows: 0,
            payload_len: 0,
        })
    }

    /// Copies the record whose head was just read from `from` into this shard.
    pub fn copy_record(
        &mut self,
        head: &RecordHead,
        from: &mut ShardReader,
        scratch: &mut Vec<u8>,
    ) -> Result<(), OutputError> {
        let mut fixed = Vec::with_capacity(RECORD_HEAD + head.id.len());
        fixed.extend_from_slice(&head.index.to_le_bytes());
        fixed.extend_from_slice(&head.record.to_le_bytes());
        fixed.extend_from_slice(&head.residues.to_le_bytes());
        fixed.extend_from_slice(&(head.id.len() as u32).to_le_bytes());
        fixed.extend_from_slice(&head.digest.to_le_bytes());
        fixed.extend_from_slice(head.id.as_bytes());
        let mut counting = Counting {
            inner: &mut self.out,
            crc: &mut self.crc,
            len: &mut self.payload_len,
        };
        counting
            .write_all(&fixed)
            .map_err(|source| OutputError::Io {
                path: self.path.clone(),
                source,
            })?;
        from.copy_payload(&mut counting, scratch, &self.path)?;
        self.records += 1;
        if self.layout.per_token {
            self.token_rows += u64::from(head.residues);
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), OutputError> {
        let header = Header {
            layout: self.layout,
            records: self.records,
            token_rows: self.token_rows,
            payload_len: self.payload_len,
            payload_crc: self.crc.finalize(),
        };
        let io = |source| OutputError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        let mut file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header.encode()).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn layout(per_token: bool) -> Layout {
        Layout {
            hidden: 3,
            dtype: OutputDtype::F32,
            per_token,
        }
    }

    proptest! {
        /// Whatever the arrival order, a shard reads back sorted by index with every byte intact.
        #[test]
        fn round_trip_sorted(mut indices in proptest::collection::hash_set(0u64..10_000, 0..50)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>()), per_token: bool) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("s.bin");
            let l = layout(per_token);
            let mut pending = Pending::default();
            let record = |i: u64| {
                let residues = (i % 4) as u32;
                let mean: Vec<u8> = (0..l.row_bytes()).map(|k| (i as usize * 7 + k) as u8).collect();
                let tokens: Vec<u8> =
                    (0..residues as usize * l.row_bytes()).map(|k| (i as usize + k) as u8).collect();
                (residues, format!("seq{i}é"), mean, tokens)
            };
            for &i in &indices {
                let (residues, id, mean, tokens) = record(i);
                let seq = virnuc_core::SequenceMeta { index: i, record: i / 2, id: id.clone(), residues };
                pending.push(&seq, i ^ 7, &mean, per_token.then_some(&tokens[..]));
            }
            pending.write_to(&path, l).expect("written");
            prop_assert!(pending.is_empty());
            indices.sort_unstable();
            let mut reader = ShardReader::open(&path, l, 4096).expect("opens");
            for &i in &indices {
                let head = reader.next_record().expect("reads").expect("a record");
                let (residues, id, mean, tokens) = record(i);
                prop_assert_eq!(&head, &RecordHead { index: i, record: i / 2, residues, id, digest: i ^ 7 });
                let mut m = vec![0u8; l.row_bytes()];
                let mut t = vec![0u8; if per_token { tokens.len() } else { 0 }];
                reader.read_payload(&mut m, &mut t).expect("payload");
                prop_assert_eq!(m, mean);
                if per_token {
                    prop_assert_eq!(t, tokens);
                }
            }
            prop_assert!(reader.next_record().expect("reads").is_none());
            reader.finish().expect("checksum matches");
        }
    }

    #[test]
    fn a_flipped_payload_byte_or_truncation_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.bin");
        let l = layout(false);
        let mut pending = Pending::default();
        for i in 0..10 {
            let seq = virnuc_core::SequenceMeta {
                index: i,
                record: i,
                id: "x".into(),
                residues: 1,
            };
            pending.push(&seq, 0, &[1u8; 12], None);
        }
        pending.write_to(&path, l).expect("written");
        let good = std::fs::read(&path).expect("read");
        ShardReader::open(&path, l, 64)
            .and_then(|r| r.scan(|_| {}))
            .expect("intact shard passes");

        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        let err = ShardReader::open(&path, l, 64)
            .and_then(|r| r.scan(|_| {}))
            .expect_err("flipped byte detected");
        assert!(err.to_string().contains("checksum"), "{err}");

        std::fs::write(&path, &good[..good.len() - 5]).expect("write");
        let err = ShardReader::open(&path, l, 64).expect_err("truncation detected");
        assert!(err.to_string().contains("bytes"), "{err}");

        let mut bad_header = good;
        bad_header[20] ^= 1;
        std::fs::write(&path, &bad_header).expect("write");
        let err = ShardReader::open(&path, l, 64).expect_err("header damage detected");
        assert!(err.to_string().contains("header checksum"), "{err}");
    }
}
