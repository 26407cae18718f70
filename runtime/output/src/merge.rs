//! Turning shards into the final HDF5 file: a k-way merge by sequence index in bounded memory.
//!
//! Every shard is sorted by index, so a heap over the shards' next records yields all records in
//! input order while holding one record head and one read buffer per shard. More shards than
//! [`FAN_IN`] are first merged in groups into scratch runs (never journaled: a crash during finish
//! simply redoes the merge from the journaled shards). The final file is written strictly in index
//! order, chunk by chunk, so its bytes depend only on its contents, never on how the shards were cut.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use hdf5::file::{AttrCreationOrder, MetadataCacheConfig};
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, H5Type};

use crate::OutputError;
use crate::shard::{Layout, RecordHead, ShardReader, StreamWriter};

/// Shards open at once (file descriptors and read buffers are per shard).
pub(crate) const FAN_IN: usize = 64;
/// Read buffer per shard during a merge.
const READ_BUFFER: usize = 64 << 10;
/// Target bytes of one HDF5 chunk: large enough for fast sequential reads, small enough that reading
/// one embedding does not drag in megabytes.
const CHUNK_BYTES: usize = 512 << 10;

/// Heap merge over sorted shards.
struct Merger {
    readers: Vec<Option<ShardReader>>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    heads: Vec<Option<RecordHead>>,
}

impl Merger {
    fn new(paths: &[PathBuf], layout: Layout) -> Result<Self, OutputError> {
        let mut merger = Self {
            readers: Vec::with_capacity(paths.len()),
            heap: BinaryHeap::with_capacity(paths.len()),
            heads: Vec::with_capacity(paths.len()),
        };
        for path in paths {
            merger
                .readers
                .push(Some(ShardReader::open(path, layout, READ_BUFFER)?));
            merger.heads.push(None);
        }
        for i in 0..paths.len() {
            merger.advance(i)?;
        }
        Ok(merger)
    }

    /// Reads reader `i`'s next head into the heap, or checks and closes the reader when it is done.
    fn advance(&mut self, i: usize) -> Result<(), OutputError> {
        let Some(reader) = self.readers[i].as_mut() else {
            return Ok(());
        };
        match reader.next_record()? {
            Some(head) => {
                self.heap.push(Reverse((head.index, i)));
                self.heads[i] = Some(head);
            }
            None => {
                if let Some(reader) = self.readers[i].take() {
                    reader.finish()?;
                }
            }
        }
        Ok(())
    }

    /// The smallest pending record: its head and the reader positioned at its payload. The caller
    /// consumes the payload, then calls [`Merger::advance`] with the returned reader number.
    fn pop(&mut self) -> Option<(RecordHead, usize)> {
        let Reverse((_, i)) = self.heap.pop()?;
        self.heads[i].take().map(|head| (head, i))
    }

    fn reader(&mut self, i: usize) -> Result<&mut ShardReader, OutputError> {
        self.readers[i]
            .as_mut()
            .ok_or_else(|| OutputError::Internal("merge reader closed early".into()))
    }
}

/// Merges `inputs` (sorted shards) in groups of [`FAN_IN`] until at most `FAN_IN` runs remain.
/// Scratch runs go to `scratch`; inputs that are themselves scratch runs are deleted once merged.
pub(crate) fn reduce(
    mut inputs: Vec<PathBuf>,
    scratch: &Path,
    layout: Layout,
) -> Result<Vec<PathBuf>, OutputError> {
    let mut pass = 0;
    let mut scratch_buf = Vec::new();
    while inputs.len() > FAN_IN {
        let mut outputs = Vec::new();
        for (g, group) in inputs.chunks(FAN_IN).enumerate() {
            if group.len() == 1 {
                outputs.push(group[0].clone());
                continue;
            }
            let out = scratch.join(format!("run-{pass}-{g}.bin"));
            let mut writer = StreamWriter::create(&out, layout)?;
            let mut merger = Merger::new(group, layout)?;
            while let Some((head, i)) = merger.pop() {
                writer.copy_record(&head, merger.reader(i)?, &mut scratch_buf)?;
                merger.advance(i)?;
            }
            writer.finish()?;
            for path in group {
                if path.starts_with(scratch) {
                    std::fs::remove_file(path).map_err(|source| OutputError::Io {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
            outputs.push(out);
        }
        inputs = outputs;
        pass += 1;
    }
    Ok(inputs)
}

/// Rows of a dataset buffered and written a whole number of chunks at a time.
struct Rows<T> {
    dataset: Dataset,
    name: &'static str,
    /// Elements per row (1 for 1-D datasets).
    width: usize,
    chunk_rows: usize,
    buf: Vec<T>,
    written: usize,
}

impl<T: H5Type + Clone> Rows<T> {
    fn new(dataset: Dataset, name: &'static str, width: usize, chunk_rows: usize) -> Self {
        Self {
            dataset,
            name,
            width,
            chunk_rows: chunk_rows.max(1),
            buf: Vec::new(),
            written: 0,
        }
    }

    fn buffered_rows(&self) -> usize {
        self.buf.len() / self.width
    }

    /// Writes the buffered whole chunks (all buffered rows when `all`).
    fn flush(&mut self, all: bool, path: &Path) -> Result<(), OutputError> {
        let rows = if all {
            self.buffered_rows()
        } else {
            self.buffered_rows() / self.chunk_rows * self.chunk_rows
        };
        if rows == 0 {
            return Ok(());
        }
        let elems = rows * self.width;
        let hdf5_err = |source| OutputError::Hdf5 {
            path: path.to_path_buf(),
            what: self.name,
            source,
        };
        let range = self.written..self.written + rows;
        if self.width == 1 {
            self.dataset
                .write_slice(&self.buf[..elems], range)
                .map_err(hdf5_err)?;
        } else {
            let view = ndarray::ArrayView2::from_shape((rows, self.width), &self.buf[..elems])
                .map_err(|e| OutputError::Internal(format!("{}: {e}", self.name)))?;
            self.dataset
                .write_slice(view, (range, ..))
                .map_err(hdf5_err)?;
        }
        self.buf.drain(..elems);
        self.written += rows;
        Ok(())
    }

    fn push(
        &mut self,
        values: impl IntoIterator<Item = T>,
        path: &Path,
    ) -> Result<(), OutputError> {
        self.buf.extend(values);
        if self.buffered_rows() >= self.chunk_rows {
            self.flush(false, path)?;
        }
        Ok(())
    }
}

/// Float rows in the output dtype, decoded from the shards' little-endian bytes.
enum FloatRows {
    F32(Rows<f32>),
    F16(Rows<half::f16>),
}

impl FloatRows {
    fn push_le(&mut self, bytes: &[u8], path: &Path) -> Result<(), OutputError> {
        match self {
            Self::F32(rows) => rows.push(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                path,
            ),
            Self::F16(rows) => rows.push(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
                path,
            ),
        }
    }

    fn flush(&mut self, path: &Path) -> Result<(), OutputError> {
        match self {
            Self::F32(rows) => rows.flush(true, path),
            Self::F16(rows) => rows.flush(true, path),
        }
    }
}

const IDS_CHUNK_ROWS: usize = 4096;

/// Rows of a chunk of about [`CHUNK_BYTES`], at least 1 and at most `total` (HDF5 refuses chunks
/// larger than a fixed-size dimension).
fn chunk_rows(total: u64, row_bytes: usize) -> usize {
    let rows = (CHUNK_BYTES / row_bytes.max(1)).max(1);
    rows.min(usize::try_from(total).unwrap_or(usize::MAX))
}

fn new_dataset<T: H5Type>(
    file: &hdf5::File,
    name: &'static str,
    shape: &[usize],
    chunk: &[usize],
    path: &Path,
) -> Result<Dataset, OutputError> {
    let builder = file
        .new_dataset::<T>()
        // Creation/modification times in object headers would make two runs' files differ.
        .obj_track_times(false)
        // Rows are written in order, whole chunks at a time (only the last one partial): a chunk is
        // never touched again, so caching it would only hold memory.
        .chunk_cache(0, 0, 1.0);
    let builder = if shape.iter().all(|&d| d > 0) {
        builder.chunk(chunk.to_vec())
    } else {
        // HDF5 cannot chunk an empty fixed-size dimension; an empty dataset needs no chunks.
        builder
    };
    builder
        .shape(shape.to_vec())
        .create(name)
        .map_err(|source| OutputError::Hdf5 {
            path: path.to_path_buf(),
            what: name,
            source,
        })
}

/// What the final file holds, for the summary.
pub(crate) struct Written {
    pub token_rows: u64,
}

/// The final file's datasets, filled row by row in output order, a whole number of chunks at a
/// time. Shared by the end of a run ([`write_final`]) and by [`crate::parts::merge_outputs`], so a
/// merged file is laid out exactly as a single run's.
pub(crate) struct FinalWriter {
    path: PathBuf,
    file: hdf5::File,
    layout: Layout,
    expected: u64,
    ids: Rows<VarLenUnicode>,
    embeddings: FloatRows,
    lengths: Rows<u32>,
    records: Rows<u64>,
    per_token: Option<(FloatRows, Rows<u64>)>,
    next: u64,
    tokens_so_far: u64,
}

impl FinalWriter {
    /// Creates `path` for `expected` rows and `token_rows` per-token rows, attributes first (in
    /// this order; HDF5 keeps it).
    pub fn create(
        path: &Path,
        layout: Layout,
        attributes: &[(String, String)],
        expected: u64,
        token_rows: u64,
    ) -> Result<Self, OutputError> {
        let h5 = |what: &'static str| {
            move |source| OutputError::Hdf5 {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        // HDF5's metadata cache grows to 32 MiB by default, mostly with the global heap of the
        // variable-length ids; 4 MiB keeps the merge's memory small at no measurable cost (every
        // object is written once, in order).
        let metadata_cache = MetadataCacheConfig {
            initial_size: 1 << 20,
            min_size: 1 << 20,
            max_size: 4 << 20,
            ..MetadataCacheConfig::default()
        };
        let file = hdf5::File::with_options()
            // Attribute creation order is kept so that `merge` can copy the attributes in the
            // order the run wrote them (the file then equals a single run's byte for byte).
            .with_fcpl(|p| {
                p.obj_track_times(false)
                    .attr_creation_order(AttrCreationOrder::Indexed)
            })
            // The output is private to this process until renamed; HDF5's own flock only fails on
            // file systems without locks (some NFS mounts).
            .with_fapl(|p| p.file_locking(false).mdc_config(&metadata_cache))
            .create(path)
            .map_err(h5("file"))?;
        for (key, value) in attributes {
            let value: VarLenUnicode = value.parse().map_err(|e| OutputError::InvalidConfig {
                message: format!("attribute {key}: {e}"),
            })?;
            file.new_attr::<VarLenUnicode>()
                .create(key.as_str())
                .and_then(|a| a.write_scalar(&value))
                .map_err(h5("attribute"))?;
        }
        let n = usize::try_from(expected).map_err(|_| {
            OutputError::Internal(format!("{expected} sequences do not fit in memory"))
        })?;
        let h = layout.hidden;
        // A variable-length string element is a 16-byte global-heap reference, but writing one
        // also allocates its string (here and in HDF5's heap), so id chunks hold a fixed 4096 rows
        // rather than 512 KiB of references.
        let ids_chunk = IDS_CHUNK_ROWS.min(n);
        let ids = Rows::<VarLenUnicode>::new(
            new_dataset::<VarLenUnicode>(&file, "sequence_ids", &[n], &[ids_chunk], path)?,
            "sequence_ids",
            1,
            ids_chunk,
        );
        let emb_chunk = chunk_rows(expected, layout.row_bytes());
        let float_rows =
            |name: &'static str, rows: usize, chunk: usize| -> Result<_, OutputError> {
                Ok(match layout.dtype {
                    crate::OutputDtype::F32 => FloatRows::F32(Rows::new(
                        new_dataset::<f32>(&file, name, &[rows, h], &[chunk, h], path)?,
                        name,
                        h,
                        chunk,
                    )),
                    crate::OutputDtype::F16 => FloatRows::F16(Rows::new(
                        new_dataset::<half::f16>(&file, name, &[rows, h], &[chunk, h], path)?,
                        name,
                        h,
                        chunk,
                    )),
                })
            };
        let embeddings = float_rows("embeddings", n, emb_chunk)?;
        let len_chunk = chunk_rows(expected, 4);
        let lengths = Rows::<u32>::new(
            new_dataset::<u32>(&file, "lengths", &[n], &[len_chunk], path)?,
            "lengths",
            1,
            len_chunk,
        );
        let rec_chunk = chunk_rows(expected, 8);
        let records = Rows::<u64>::new(
            new_dataset::<u64>(&file, "input_record", &[n], &[rec_chunk], path)?,
            "input_record",
            1,
            rec_chunk,
        );
        let mut per_token = if layout.per_token {
            let t = usize::try_from(token_rows)
                .map_err(|_| OutputError::Internal(format!("{token_rows} token rows")))?;
            let tok_chunk = chunk_rows(token_rows, layout.row_bytes());
            let off_chunk = chunk_rows(expected + 1, 8);
            let states = float_rows("token_states", t, tok_chunk)?;
            let offsets = Rows::<u64>::new(
                new_dataset::<u64>(&file, "token_offsets", &[n + 1], &[off_chunk], path)?,
                "token_offsets",
                1,
                off_chunk,
            );
            Some((states, offsets))
        } else {
            None
        };
        if let Some((_, offsets)) = per_token.as_mut() {
            offsets.push([0u64], path)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            layout,
            expected,
            ids,
            embeddings,
            lengths,
            records,
            per_token,
            next: 0,
            tokens_so_far: 0,
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.next
    }

    /// Appends the next row: its mean row and (per-token output) its residue rows, little-endian
    /// in the output dtype.
    pub fn push(
        &mut self,
        id: &str,
        residues: u32,
        record: u64,
        mean: &[u8],
        tokens: &[u8],
    ) -> Result<(), OutputError> {
        let path = self.path.as_path();
        if self.next >= self.expected {
            return Err(OutputError::OutOfRange {
                index: self.next,
                expected: self.expected,
            });
        }
        let token_bytes = if self.layout.per_token {
            residues as usize * self.layout.row_bytes()
        } else {
            0
        };
        if mean.len() != self.layout.row_bytes() || tokens.len() != token_bytes {
            return Err(OutputError::Internal(format!(
                "row {} ({id}): {} mean and {} token bytes, expected {} and {token_bytes}",
                self.next,
                mean.len(),
                tokens.len(),
                self.layout.row_bytes()
            )));
        }
        let value: VarLenUnicode = id.parse().map_err(|_| OutputError::InvalidId {
            index: self.next,
            id: id.to_string(),
        })?;
        self.ids.push([value], path)?;
        self.embeddings.push_le(mean, path)?;
        self.lengths.push([residues], path)?;
        self.records.push([record], path)?;
        if let Some((states, offsets)) = self.per_token.as_mut() {
            states.push_le(tokens, path)?;
            self.tokens_so_far += u64::from(residues);
            offsets.push([self.tokens_so_far], path)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Writes what is buffered and closes the file; every one of the `expected` rows must be there.
    pub fn finish(self) -> Result<Written, OutputError> {
        let Self {
            path,
            file,
            expected,
            mut ids,
            mut embeddings,
            mut lengths,
            mut records,
            per_token,
            next,
            tokens_so_far,
            ..
        } = self;
        if next != expected {
            return Err(OutputError::Missing {
                index: next,
                missing: expected - next,
                expected,
            });
        }
        let path = path.as_path();
        ids.flush(true, path)?;
        embeddings.flush(path)?;
        lengths.flush(true, path)?;
        records.flush(true, path)?;
        if let Some((mut states, mut offsets)) = per_token {
            states.flush(path)?;
            offsets.flush(true, path)?;
        }
        // Every dataset handle must be closed before the file, or H5Fclose leaves it open.
        drop((ids, embeddings, lengths, records));
        file.close().map_err(|source| OutputError::Hdf5 {
            path: path.to_path_buf(),
            what: "close",
            source,
        })?;
        Ok(Written {
            token_rows: tokens_so_far,
        })
    }
}

/// Writes the final HDF5 file at `path` from sorted `runs` covering exactly `0..expected`.
pub(crate) fn write_final(
    path: &Path,
    runs: &[PathBuf],
    layout: Layout,
    attributes: &[(String, String)],
    expected: u64,
    token_rows: u64,
) -> Result<Written, OutputError> {
    let mut out = FinalWriter::create(path, layout, attributes, expected, token_rows)?;
    let mut merger = Merger::new(runs, layout)?;
    let mut mean = vec![0u8; layout.row_bytes()];
    let mut tokens = Vec::new();
    while let Some((head, i)) = merger.pop() {
        // The index set was verified before the merge; this guards the merge itself.
        let next = out.rows();
        if head.index != next {
            return Err(if head.index < next {
                OutputError::Duplicate {
                    index: head.index,
                    id: head.id,
                }
            } else {
                OutputError::Missing {
                    index: next,
                    missing: head.index - next,
                    expected,
                }
            });
        }
        let token_bytes = if layout.per_token {
            head.residues as usize * layout.row_bytes()
        } else {
            0
        };
        tokens.resize(token_bytes, 0);
        merger.reader(i)?.read_payload(&mut mean, &mut tokens)?;
        merger.advance(i)?;
        out.push(&head.id, head.residues, head.record, &mean, &tokens)?;
    }
    out.finish()
}

/// The first of `attributes` whose value in the finished output at `path` differs (or is missing
/// there): `(key, existing, requested)`.
pub(crate) fn first_differing_attribute(
    path: &Path,
    attributes: &[(String, String)],
) -> Result<Option<(String, String, String)>, OutputError> {
    let not_output = |source| OutputError::NotAnOutput {
        path: path.to_path_buf(),
        source,
    };
    let file = hdf5::File::with_options()
        .with_fapl(|p| p.file_locking(false))
        .open(path)
        .map_err(not_output)?;
    for (key, requested) in attributes {
        let existing = match file.attr(key) {
            Ok(a) => a
                .read_scalar::<VarLenUnicode>()
                .map_err(not_output)?
                .as_str()
                .to_string(),
            Err(_) => "(missing)".to_string(),
        };
        if existing != *requested {
            return Ok(Some((key.clone(), existing, requested.clone())));
        }
    }
    Ok(None)
}
