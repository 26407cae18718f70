//! Joining the finished files of `--input-shard I/N` runs into the file one run over the whole
//! input writes (`virnuc-trt merge`): `embed` outputs, or `predict`'s prediction_scores.h5 (the
//! same layout: per-frame scores as 2-wide rows, `content = virnucpro_predict`).
//!
//! Every row stores the input position of its record (`input_record`), and shard `I` of `N` holds
//! exactly the records at positions ≡ `I` mod `N`, each record's rows consecutive. So the whole
//! input order is a k-way merge of the parts by `input_record`: nothing is guessed. The parts are
//! read in blocks of rows and the output is written chunk by chunk through the same
//! [`FinalWriter`] as a single run, so memory is bounded by the number of parts times the block,
//! never by the number of rows, and the merged file equals a single run's file byte for byte when
//! the rows are equal.
//!
//! Refused, before anything is written: parts of different subcommands (embed outputs with
//! predict scores), parts whose attributes (model, settings, versions) or layout differ, different shard counts, a shard missing or given twice, a file that is not a
//! shard (`input_shard = all`), and a part written before `input_record` existed. While merging:
//! a row whose record does not belong to its part's shard, or records out of order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use hdf5::file::MetadataCacheConfig;
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, IndexType, IterationOrder};

use crate::merge::FinalWriter;
use crate::shard::Layout;
use crate::{OutputDtype, OutputError};

/// Rows read from each part at a time when not told otherwise.
pub const DEFAULT_BLOCK_ROWS: usize = 1024;
/// Bytes of per-token states read from each part at a time (or one sequence's, if larger).
const TOKEN_BLOCK_BYTES: usize = 8 << 20;

/// What [`merge_outputs`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    pub path: PathBuf,
    pub parts: usize,
    /// Shard count `N` of the parts.
    pub shards: u64,
    pub sequences: u64,
    pub token_rows: u64,
    pub bytes: u64,
}

/// One part, opened and checked.
struct Part {
    path: PathBuf,
    file: hdf5::File,
    attributes: Vec<(String, String)>,
    shard: (u64, u64),
    layout: Layout,
    rows: u64,
    token_rows: u64,
}

fn not_a_part(path: &Path, message: impl Into<String>) -> OutputError {
    OutputError::NotAPart {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn h5_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(hdf5::Error) -> OutputError + 'a {
    move |source| OutputError::Hdf5 {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn parse_shard(text: &str) -> Option<(u64, u64)> {
    let (i, n) = text.split_once('/')?;
    let (i, n) = (i.parse().ok()?, n.parse().ok()?);
    (i < n).then_some((i, n))
}

fn dataset(path: &Path, file: &hdf5::File, name: &str) -> Result<Dataset, OutputError> {
    file.dataset(name)
        .map_err(|_| not_a_part(path, format!("has no `{name}` dataset")))
}

impl Part {
    fn open(path: &Path) -> Result<Self, OutputError> {
        // HDF5's metadata cache grows to 32 MiB per open file by default, mostly with the global
        // heap of the variable-length ids read: 1 MiB per part keeps the merge's memory bounded by
        // the number of parts (rows are read once, in order, so a larger cache buys nothing).
        let metadata_cache = MetadataCacheConfig {
            initial_size: 1 << 20,
            min_size: 1 << 20,
            max_size: 1 << 20,
            ..MetadataCacheConfig::default()
        };
        let file = hdf5::File::with_options()
            .with_fapl(|p| p.file_locking(false).mdc_config(&metadata_cache))
            .open(path)
            .map_err(|source| OutputError::NotAnOutput {
                path: path.to_path_buf(),
                source,
            })?;
        let names = file
            .attr_names_by(IndexType::CreationOrder, IterationOrder::Increasing)
            .map_err(|_| {
                not_a_part(
                    path,
                    "attributes have no creation order (written by an older virnuc-trt; re-run \
                     that shard)",
                )
            })?;
        let mut attributes = Vec::with_capacity(names.len());
        for name in names {
            let value = file
                .attr(&name)
                .and_then(|a| a.read_scalar::<VarLenUnicode>())
                .map_err(|_| not_a_part(path, format!("attribute {name} is not a string")))?;
            attributes.push((name, value.as_str().to_string()));
        }
        let shard_text = attributes
            .iter()
            .find(|(k, _)| k == "input_shard")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| not_a_part(path, "has no input_shard attribute"))?;
        let shard = parse_shard(&shard_text).ok_or_else(|| {
            not_a_part(
                path,
                format!(
                    "input_shard is {shard_text:?}: not one shard of an --input-shard run, \
                     nothing to merge"
                ),
            )
        })?;
        let emb = dataset(path, &file, "embeddings")?;
        let shape = emb.shape();
        let [rows, hidden] = shape[..] else {
            return Err(not_a_part(path, "embeddings is not 2-D"));
        };
        let dtype = match emb.dtype().map(|t| t.size()) {
            Ok(4) => OutputDtype::F32,
            Ok(2) => OutputDtype::F16,
            _ => {
                return Err(not_a_part(
                    path,
                    "embeddings are neither float32 nor float16",
                ));
            }
        };
        for name in ["sequence_ids", "lengths"] {
            if dataset(path, &file, name)?.shape() != [rows] {
                return Err(not_a_part(path, format!("{name} has not {rows} rows")));
            }
        }
        if dataset(path, &file, "input_record")
            .map_err(|_| {
                not_a_part(
                    path,
                    "has no input_record dataset (written by an older virnuc-trt; re-run that \
                     shard)",
                )
            })?
            .shape()
            != [rows]
        {
            return Err(not_a_part(
                path,
                format!("input_record has not {rows} rows"),
            ));
        }
        let per_token = file.dataset("token_states").is_ok();
        let token_rows = if per_token {
            let states = dataset(path, &file, "token_states")?.shape();
            if states.len() != 2 || states[1] != hidden {
                return Err(not_a_part(path, "token_states do not match embeddings"));
            }
            if dataset(path, &file, "token_offsets")?.shape() != [rows + 1] {
                return Err(not_a_part(
                    path,
                    format!("token_offsets has not {rows} + 1 rows"),
                ));
            }
            states[0] as u64
        } else {
            0
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            attributes,
            shard,
            layout: Layout {
                hidden,
                dtype,
                per_token,
            },
            rows: rows as u64,
            token_rows,
        })
    }
}

/// What a part holds, by its `content` attribute: `predict` writes `virnucpro_predict` (its
/// per-frame scores), `embed` writes none.
fn content(p: &Part) -> &str {
    p.attributes
        .iter()
        .find(|(k, _)| k == "content")
        .map_or("embeddings", |(_, v)| match v.as_str() {
            "virnucpro_predict" => "predict scores",
            other => other,
        })
}

/// The first way `part` differs from `first` (other than its shard number), for the error message.
fn difference(first: &Part, part: &Part) -> Option<String> {
    if content(first) != content(part) {
        return Some(format!(
            "content ({} vs {}: parts of different subcommands)",
            content(first),
            content(part)
        ));
    }
    if first.shard.1 != part.shard.1 {
        return Some(format!(
            "shard count ({} vs {}: parts of different splits)",
            first.shard.1, part.shard.1
        ));
    }
    if first.layout != part.layout {
        return Some(format!(
            "layout (hidden {} {:?} per-token {} vs hidden {} {:?} per-token {})",
            first.layout.hidden,
            first.layout.dtype,
            first.layout.per_token,
            part.layout.hidden,
            part.layout.dtype,
            part.layout.per_token
        ));
    }
    let settings = |p: &Part| -> Vec<(String, String)> {
        p.attributes
            .iter()
            .filter(|(k, _)| k != "input_shard")
            .cloned()
            .collect()
    };
    let (a, b) = (settings(first), settings(part));
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) if x.0 == y.0 => {
                return Some(format!("attribute {} ({:?} vs {:?})", x.0, x.1, y.1));
            }
            (x, y) => {
                let name = |a: Option<&(String, String)>| {
                    a.map_or_else(|| "(none)".to_string(), |a| a.0.clone())
                };
                return Some(format!("attributes ({} vs {})", name(x), name(y)));
            }
        }
    }
    None
}

/// Reads one part's rows in order, a block at a time.
struct Cursor {
    index: usize,
    shard: (u64, u64),
    path: PathBuf,
    layout: Layout,
    ids: Dataset,
    embeddings: Dataset,
    lengths: Dataset,
    records: Dataset,
    tokens: Option<(Dataset, Dataset)>,
    rows: u64,
    token_rows: u64,
    block_rows: usize,
    /// Rows `block_start .. block_start + block_ids.len()` are buffered.
    block_start: u64,
    block_ids: Vec<String>,
    block_lengths: Vec<u32>,
    block_records: Vec<u64>,
    /// Mean rows of the block, little-endian in the output dtype.
    block_mean: Vec<u8>,
    /// `token_offsets[block_start ..= block end]`.
    block_offsets: Vec<u64>,
    /// Token rows `tok_start .. tok_start + tok_buf.len() / row_bytes`, little-endian.
    tok_start: u64,
    tok_buf: Vec<u8>,
    /// Next row to deliver.
    next: u64,
    last_record: Option<u64>,
}

fn floats_le(
    ds: &Dataset,
    dtype: OutputDtype,
    rows: std::ops::Range<usize>,
    out: &mut Vec<u8>,
) -> hdf5::Result<()> {
    out.clear();
    match dtype {
        OutputDtype::F32 => {
            let a = ds.read_slice_2d::<f32, _>((rows, ..))?;
            for v in a.iter() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        OutputDtype::F16 => {
            let a = ds.read_slice_2d::<half::f16, _>((rows, ..))?;
            for v in a.iter() {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
    }
    Ok(())
}

impl Cursor {
    fn new(index: usize, part: &Part, block_rows: usize) -> Result<Self, OutputError> {
        let path = part.path.as_path();
        let f = &part.file;
        let tokens = if part.layout.per_token {
            Some((
                dataset(path, f, "token_states")?,
                dataset(path, f, "token_offsets")?,
            ))
        } else {
            None
        };
        Ok(Self {
            index,
            shard: part.shard,
            path: part.path.clone(),
            layout: part.layout,
            ids: dataset(path, f, "sequence_ids")?,
            embeddings: dataset(path, f, "embeddings")?,
            lengths: dataset(path, f, "lengths")?,
            records: dataset(path, f, "input_record")?,
            tokens,
            rows: part.rows,
            token_rows: part.token_rows,
            block_rows: block_rows.max(1),
            block_start: 0,
            block_ids: Vec::new(),
            block_lengths: Vec::new(),
            block_records: Vec::new(),
            block_mean: Vec::new(),
            block_offsets: Vec::new(),
            tok_start: 0,
            tok_buf: Vec::new(),
            next: 0,
            last_record: None,
        })
    }

    fn corrupt(&self, message: String) -> OutputError {
        OutputError::PartOrder {
            path: self.path.clone(),
            message,
        }
    }

    /// Makes row `self.next` available in the block buffers.
    fn fill(&mut self) -> Result<(), OutputError> {
        let buffered = self.block_start..self.block_start + self.block_ids.len() as u64;
        if buffered.contains(&self.next) {
            return Ok(());
        }
        let path = self.path.clone();
        let a = self.next as usize;
        let b = (self.next + self.block_rows as u64).min(self.rows) as usize;
        self.block_ids = self
            .ids
            .read_slice_1d::<VarLenUnicode, _>(a..b)
            .map_err(h5_err(&path, "sequence_ids"))?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
        self.block_lengths = self
            .lengths
            .read_slice_1d::<u32, _>(a..b)
            .map_err(h5_err(&path, "lengths"))?
            .to_vec();
        self.block_records = self
            .records
            .read_slice_1d::<u64, _>(a..b)
            .map_err(h5_err(&path, "input_record"))?
            .to_vec();
        floats_le(
            &self.embeddings,
            self.layout.dtype,
            a..b,
            &mut self.block_mean,
        )
        .map_err(h5_err(&path, "embeddings"))?;
        if let Some((_, offsets)) = &self.tokens {
            self.block_offsets = offsets
                .read_slice_1d::<u64, _>(a..b + 1)
                .map_err(h5_err(&path, "token_offsets"))?
                .to_vec();
        }
        self.block_start = self.next;
        Ok(())
    }

    /// The input record of the next row, or `None` when the part is done; checks that it belongs
    /// to this shard and does not go backwards.
    fn peek_record(&mut self) -> Result<Option<u64>, OutputError> {
        if self.next >= self.rows {
            return Ok(None);
        }
        self.fill()?;
        let record = self.block_records[(self.next - self.block_start) as usize];
        let (i, n) = self.shard;
        if record % n != i {
            return Err(self.corrupt(format!(
                "row {} comes from input record {record}, which is not in shard {i}/{n}",
                self.next
            )));
        }
        if self.last_record.is_some_and(|last| record < last) {
            return Err(self.corrupt(format!(
                "row {}: input record {record} after {}",
                self.next,
                self.last_record.unwrap_or_default()
            )));
        }
        Ok(Some(record))
    }

    /// Copies the next row into `out` and moves on.
    fn copy_row(&mut self, out: &mut FinalWriter) -> Result<(), OutputError> {
        self.fill()?;
        let k = (self.next - self.block_start) as usize;
        let row_bytes = self.layout.row_bytes();
        let residues = self.block_lengths[k];
        let record = self.block_records[k];
        let mean = &self.block_mean[k * row_bytes..(k + 1) * row_bytes];
        let tokens = if let Some((states, _)) = &self.tokens {
            let (start, end) = (self.block_offsets[k], self.block_offsets[k + 1]);
            if end < start || end - start != u64::from(residues) || end > self.token_rows {
                return Err(self.corrupt(format!(
                    "row {}: token_offsets {start}..{end} do not match its length {residues}",
                    self.next
                )));
            }
            let have = self.tok_start..self.tok_start + (self.tok_buf.len() / row_bytes) as u64;
            if start < have.start || end > have.end {
                let rows = ((TOKEN_BLOCK_BYTES / row_bytes.max(1)) as u64)
                    .max(end - start)
                    .min(self.token_rows - start);
                floats_le(
                    states,
                    self.layout.dtype,
                    start as usize..(start + rows) as usize,
                    &mut self.tok_buf,
                )
                .map_err(h5_err(&self.path, "token_states"))?;
                self.tok_start = start;
            }
            let at = ((start - self.tok_start) as usize) * row_bytes;
            &self.tok_buf[at..at + residues as usize * row_bytes]
        } else {
            &[][..]
        };
        out.push(&self.block_ids[k], residues, record, mean, tokens)?;
        self.last_record = Some(record);
        self.next += 1;
        Ok(())
    }
}

/// Merges the `--input-shard` outputs `parts` (any order) into `out`, which must not exist. At
/// most `block_rows` rows per part are held in memory at a time.
pub fn merge_outputs(
    parts: &[PathBuf],
    out: &Path,
    block_rows: usize,
) -> Result<MergeSummary, OutputError> {
    if parts.is_empty() {
        return Err(OutputError::InvalidConfig {
            message: "no parts to merge".into(),
        });
    }
    if block_rows == 0 {
        return Err(OutputError::InvalidConfig {
            message: "block rows must be at least 1".into(),
        });
    }
    if out.exists() {
        return Err(OutputError::Exists {
            path: out.to_path_buf(),
        });
    }
    let opened: Vec<Part> = parts
        .iter()
        .map(|p| Part::open(p))
        .collect::<Result<_, _>>()?;
    let first = &opened[0];
    for part in &opened[1..] {
        if let Some(what) = difference(first, part) {
            return Err(OutputError::PartsDiffer {
                first: first.path.clone(),
                other: part.path.clone(),
                what,
            });
        }
    }
    let n = first.shard.1;
    let mut owner: Vec<Option<&Path>> =
        vec![None; usize::try_from(n).unwrap_or(usize::MAX).min(1 << 24)];
    if owner.len() as u64 != n {
        return Err(not_a_part(
            &first.path,
            format!("shard count {n} is implausibly large"),
        ));
    }
    for part in &opened {
        let slot = &mut owner[part.shard.0 as usize];
        if let Some(earlier) = slot {
            return Err(OutputError::ShardTwice {
                shard: format!("{}/{n}", part.shard.0),
                first: earlier.to_path_buf(),
                second: part.path.clone(),
            });
        }
        *slot = Some(&part.path);
    }
    let missing: Vec<String> = owner
        .iter()
        .enumerate()
        .filter(|(_, o)| o.is_none())
        .map(|(i, _)| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        let shown = missing
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        return Err(OutputError::ShardsMissing {
            missing: missing.len() as u64,
            count: n,
            shown,
        });
    }
    let rows: u64 = opened.iter().map(|p| p.rows).sum();
    let token_rows: u64 = opened.iter().map(|p| p.token_rows).sum();
    let attributes: Vec<(String, String)> = first
        .attributes
        .iter()
        .map(|(k, v)| {
            if k == "input_shard" {
                (k.clone(), "all".to_string())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| OutputError::InvalidConfig {
            message: format!("output path {} has no file name", out.display()),
        })?;
    let tmp = out.with_file_name(format!(".{name}.merge-{}", std::process::id()));
    let result = (|| {
        let mut writer = FinalWriter::create(&tmp, first.layout, &attributes, rows, token_rows)?;
        let mut cursors: Vec<Cursor> = opened
            .iter()
            .enumerate()
            .map(|(i, p)| Cursor::new(i, p, block_rows))
            .collect::<Result<_, _>>()?;
        let mut heap = BinaryHeap::with_capacity(cursors.len());
        for c in &mut cursors {
            if let Some(r) = c.peek_record()? {
                heap.push(Reverse((r, c.index)));
            }
        }
        // Records are disjoint between parts (each is checked against its shard), and a record's
        // rows are consecutive in its part: popping the smallest record yields the input order.
        while let Some(Reverse((_, i))) = heap.pop() {
            let c = &mut cursors[i];
            c.copy_row(&mut writer)?;
            if let Some(r) = c.peek_record()? {
                heap.push(Reverse((r, i)));
            }
        }
        drop(cursors);
        let written = writer.finish()?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|source| OutputError::Io {
                path: tmp.clone(),
                source,
            })?;
        if out.exists() {
            return Err(OutputError::Exists {
                path: out.to_path_buf(),
            });
        }
        std::fs::rename(&tmp, out).map_err(|source| OutputError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        Ok(written)
    })();
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let bytes = std::fs::metadata(out)
        .map_err(|source| OutputError::Io {
            path: out.to_path_buf(),
            source,
        })?
        .len();
    Ok(MergeSummary {
        path: out.to_path_buf(),
        parts: opened.len(),
        shards: n,
        sequences: rows,
        token_rows: written.token_rows,
        bytes,
    })
}
