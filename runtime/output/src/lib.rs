//! Embedding output: one HDF5 file in input order, written crash-safely in shards.
//!
//! The final file is a drop-in for virnucpro-broad's `embeddings.h5`:
//!
//! | dataset          | shape              | type                    |
//! |------------------|--------------------|-------------------------|
//! | `sequence_ids`   | `[N]`              | variable-length UTF-8   |
//! | `embeddings`     | `[N, H]`           | float32 or float16      |
//! | `lengths`        | `[N]`              | uint32 (residues)       |
//! | `input_record`   | `[N]`              | uint64                  |
//! | `token_states`   | `[total, H]`       | optional, residues only |
//! | `token_offsets`  | `[N + 1]`          | optional, uint64        |
//!
//! Row `i` is input sequence `i`; `input_record[i]` is the 0-based position (all input files in
//! order) of the record it comes from, which lets [`merge_outputs`] join `--input-shard` parts in
//! input order. The states of sequence `i` are
//! `token_states[token_offsets[i]..token_offsets[i + 1]]` (`<cls>`/`<eos>` excluded, as fair-esm's
//! `per_tok` output). File attributes are the caller's key/value strings. Nothing run-dependent is
//! stored and HDF5 object times are off, so equal inputs give byte-identical files.
//!
//! Packs arrive in any order. [`EmbeddingWriter::write_pack`] buffers them; every `shard_sequences`
//! sequences it writes a shard next to the output (`OUT.h5.partial/shard-N.bin`: temp file, fsync,
//! atomic rename, then a fsynced journal line). After `kill -9`, [`EmbeddingWriter::open`] with
//! `resume` keeps the journaled shards that pass their checksums and [`EmbeddingWriter::done`]
//! tells the caller which sequences to skip. [`EmbeddingWriter::finish`] checks that every index
//! `0..N` is there exactly once, merges the shards in bounded memory into a temp file and renames it
//! to the output: the output path never holds a partial file.
//!
//! ```
//! use virnuc_core::SequenceMeta;
//! use virnuc_output::{EmbeddingWriter, OutputConfig, OutputDtype};
//!
//! let dir = tempfile::tempdir()?;
//! let config = OutputConfig {
//!     path: dir.path().join("embeddings.h5"),
//!     hidden_size: 2,
//!     per_token: false,
//!     dtype: OutputDtype::F32,
//!     attributes: vec![("precision".into(), "fp32".into())],
//!     resume: false,
//!     shard_sequences: 1000,
//! };
//! let mut writer = EmbeddingWriter::open(config)?;
//! let seq = |index: u64, id: &str| SequenceMeta { index, record: index, id: id.into(), residues: 5 };
//! // Out of order, as FFD packs arrive.
//! writer.write_pack(&[seq(1, "b")], &[3.0, 4.0], None)?;
//! writer.write_pack(&[seq(0, "a")], &[1.0, 2.0], None)?;
//! let summary = writer.finish(2)?;
//! assert_eq!(summary.sequences, 2);
//! assert!(dir.path().join("embeddings.h5").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virnuc_core::SequenceMeta;

mod journal;
mod merge;
mod parts;
pub mod ranges;
mod shard;
pub mod synthetic;

pub use parts::{DEFAULT_BLOCK_ROWS, MergeSummary, merge_outputs};
use ranges::IndexSet;
use shard::{Layout, Pending, ShardReader};

/// A shard is also flushed when its buffer reaches this many bytes, whatever `shard_sequences`
/// says: per-token states of a few thousand sequences already take gigabytes.
pub const MAX_SHARD_BYTES: usize = 256 << 20;

/// Element type of `embeddings` and `token_states`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputDtype {
    F32,
    F16,
}

/// Where and how to write.
#[derive(Debug, Clone)]
pub struct OutputConfig {
    /// The final `.h5` file; working files go to `<path>.partial/`.
    pub path: PathBuf,
    pub hidden_size: usize,
    /// Also store per-token states (`token_states`, `token_offsets`).
    pub per_token: bool,
    pub dtype: OutputDtype,
    /// File attributes (model metadata JSON, precision, EP, versions, random_weights …), written in
    /// this order. Part of the resume fingerprint: a resume with different values is refused.
    pub attributes: Vec<(String, String)>,
    /// Continue an interrupted run instead of refusing existing working files.
    pub resume: bool,
    /// Sequences per shard (the unit of work lost to a crash).
    pub shard_sequences: usize,
}

/// What [`EmbeddingWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishSummary {
    pub path: PathBuf,
    pub sequences: u64,
    /// Rows of `token_states` (0 without per-token output).
    pub token_rows: u64,
    /// Shards merged (from this run and earlier ones).
    pub shards: usize,
    /// Size of the final file.
    pub bytes: u64,
}

/// What [`EmbeddingWriter::open`] found from an earlier run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeInfo {
    /// Shards kept (journaled and intact).
    pub shards_kept: usize,
    /// Sequences those shards hold (skipped by the caller through [`EmbeddingWriter::done`]).
    pub sequences_done: u64,
    /// Shards thrown away and why (not journaled, failed checksum …); their sequences are redone.
    pub discarded: Vec<(PathBuf, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{path} already exists; refusing to overwrite it (remove it or choose another output; \
         --resume only continues an interrupted run)"
    )]
    Exists { path: PathBuf },
    #[error(
        "an interrupted run left {work} ({done}); pass --resume to continue it, or delete it to \
         start over"
    )]
    PartialExists { work: PathBuf, done: String },
    #[error("{path} is already complete; nothing to resume")]
    AlreadyComplete { path: PathBuf },
    #[error(
        "{path} is complete but was made with {key} = {existing:?}, not {requested:?}: it is not \
         this run's output (remove it or choose another --out)"
    )]
    CompleteButDifferent {
        path: PathBuf,
        key: String,
        existing: String,
        requested: String,
    },
    #[error("{path} exists but is not an HDF5 file this tool can read: {source}")]
    NotAnOutput {
        path: PathBuf,
        #[source]
        source: hdf5::Error,
    },
    #[error("cannot write output to {path}: {source}")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{work} is in use by a running virnuc-trt ({owner}): wait for it to finish or stop it; \
         to run alongside it, choose another --out"
    )]
    Locked { work: PathBuf, owner: String },
    #[error(
        "cannot resume {work}: the input is not the one the interrupted run read: {message}; run \
         again with the original input, or delete {work} to start over"
    )]
    InputChanged {
        work: PathBuf,
        message: String,
        /// The caller's tag of the first differing sequence (its input file), when known.
        tag: Option<u32>,
    },
    #[error(
        "cannot write the final file: {source}; the {sequences} sequences embedded are kept in \
         {work}: free space (or fix the cause) and run the same command with --resume"
    )]
    Finish {
        work: PathBuf,
        sequences: u64,
        #[source]
        source: Box<OutputError>,
    },
    #[error(
        "cannot resume {work}: {what} differs from the interrupted run; delete it to start over"
    )]
    ResumeMismatch { work: PathBuf, what: String },
    #[error("invalid output settings: {message}")]
    InvalidConfig { message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {path} is corrupt: {message}")]
    CorruptShard { path: PathBuf, message: String },
    #[error(
        "journal {path} is corrupt: {message}; the work in its folder cannot be trusted: delete the \
         folder to start over"
    )]
    CorruptJournal { path: PathBuf, message: String },
    #[error("pack does not match the output: {message}")]
    Pack { message: String },
    #[error("sequence index {index} ({id}) was written twice")]
    Duplicate { index: u64, id: String },
    #[error("sequence index {index}: id {id:?} cannot be stored (contains NUL)")]
    InvalidId { index: u64, id: String },
    #[error(
        "{missing} of {expected} sequences are missing from the output, the first is index {index}"
    )]
    Missing {
        index: u64,
        missing: u64,
        expected: u64,
    },
    #[error("sequence index {index} is beyond the {expected} sequences expected")]
    OutOfRange { index: u64, expected: u64 },
    #[error("HDF5 error writing {what} of {path}: {source}")]
    Hdf5 {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: hdf5::Error,
    },
    #[error("{path} is not a part `merge` can join: {message}")]
    NotAPart { path: PathBuf, message: String },
    #[error("{first} and {other} are not parts of one run: their {what} differ")]
    PartsDiffer {
        first: PathBuf,
        other: PathBuf,
        what: String,
    },
    #[error("shard {shard} is given twice: {first} and {second}")]
    ShardTwice {
        shard: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{missing} of the {count} shards are missing: {shown}")]
    ShardsMissing {
        missing: u64,
        count: u64,
        shown: String,
    },
    #[error("{path} is damaged or mislabelled: {message}")]
    PartOrder { path: PathBuf, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The settings a resumed run must share with the interrupted one (`settings.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Settings {
    format: String,
    hidden_size: usize,
    dtype: OutputDtype,
    per_token: bool,
    attributes: Vec<(String, String)>,
}

const SETTINGS_FORMAT: &str = "virnuc-output/3";
const SETTINGS: &str = "settings.json";
const JOURNAL: &str = "journal";
const LOCK: &str = "lock";
const SCRATCH: &str = "merge";

/// Writes embeddings pack by pack; see the crate docs.
#[derive(Debug)]
pub struct EmbeddingWriter {
    config: OutputConfig,
    layout: Layout,
    work: PathBuf,
    journal: File,
    /// Held (OS lock) while this writer lives; released by the kernel even on `kill -9`.
    _lock: File,
    /// Every index written: durable from earlier runs, flushed in this run, or pending.
    seen: IndexSet,
    /// Durable from earlier runs, for [`EmbeddingWriter::done`].
    done: Arc<ranges::IndexSnapshot>,
    shards: Vec<journal::Entry>,
    /// How many of `shards` come from earlier runs (the rest were written by this one).
    earlier_shards: usize,
    /// The check of the re-read input against the kept shards (resume).
    input_check: Arc<InputCheck>,
    pending: Pending,
    next_shard: u64,
    resume_info: ResumeInfo,
    /// Reused encoding buffers.
    mean_buf: Vec<u8>,
    token_buf: Vec<u8>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), OutputError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), OutputError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn work_dir_of(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

fn encode_row(values: &[f32], dtype: OutputDtype, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        OutputDtype::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        OutputDtype::F16 => {
            for v in values {
                out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
}

impl EmbeddingWriter {
    /// Starts a new output, or continues an interrupted one when `config.resume` is set.
    ///
    /// Refuses: an existing output (with `resume`: [`OutputError::AlreadyComplete`]), working files
    /// of an interrupted run without `resume`, a directory that cannot be written, and a resume
    /// whose hidden size, dtype, per-token flag or attributes differ from the interrupted run's.
    pub fn open(config: OutputConfig) -> Result<Self, OutputError> {
        validate(&config)?;
        let path = config.path.clone();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if path.file_name().is_none() {
            return Err(OutputError::InvalidConfig {
                message: format!("output path {} has no file name", path.display()),
            });
        }
        match std::fs::metadata(&parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(OutputError::Unwritable {
                    path: parent,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                });
            }
            Err(source) => {
                return Err(OutputError::Unwritable {
                    path: parent,
                    source,
                });
            }
        }
        let work = work_dir_of(&path);
        if path.exists() {
            if config.resume {
                // The rename to `path` is the last step before the working files are removed, so
                // an output next to working files is complete and they are leftovers.
                if work.exists() {
                    std::fs::remove_dir_all(&work).map_err(io_err(&work))?;
                }
                // "Complete" only if it is this run's output: same settings, as a partial run's
                // journal is checked below.
                return Err(
                    match merge::first_differing_attribute(&path, &config.attributes)? {
                        None => OutputError::AlreadyComplete { path },
                        Some((key, existing, requested)) => OutputError::CompleteButDifferent {
                            path,
                            key,
                            existing,
                            requested,
                        },
                    },
                );
            }
            return Err(OutputError::Exists { path });
        }
        let layout = Layout {
            hidden: config.hidden_size,
            dtype: config.dtype,
            per_token: config.per_token,
        };
        let settings = Settings {
            format: SETTINGS_FORMAT.into(),
            hidden_size: config.hidden_size,
            dtype: config.dtype,
            per_token: config.per_token,
            attributes: config.attributes.clone(),
        };
        let fresh = !work.exists();
        if fresh {
            std::fs::create_dir(&work).map_err(|source| OutputError::Unwritable {
                path: work.clone(),
                source,
            })?;
            sync_dir(&parent)?;
        }
        // The lock first: a folder in use by a live run is that run's, whatever else is true.
        let mut lock = take_lock(&work)?;
        if !fresh && !config.resume {
            return Err(OutputError::PartialExists {
                done: describe_work(&work),
                work,
            });
        }
        write_owner(&mut lock, &work)?;

        let settings_path = work.join(SETTINGS);
        let journal_path = work.join(JOURNAL);
        let earlier = if settings_path.exists() {
            let text = std::fs::read(&settings_path).map_err(io_err(&settings_path))?;
            let previous: Settings =
                serde_json::from_slice(&text).map_err(|e| OutputError::CorruptJournal {
                    path: settings_path.clone(),
                    message: e.to_string(),
                })?;
            if let Some(what) = mismatch(&previous, &settings) {
                return Err(OutputError::ResumeMismatch { work, what });
            }
            if journal_path.exists() {
                journal::read(&journal_path)?
            } else {
                journal::Parsed::default()
            }
        } else {
            // Killed before the settings were durable: nothing of that run can be used.
            journal::Parsed::default()
        };

        let mut resume_info = ResumeInfo::default();
        let mut seen = IndexSet::new();
        let mut shards = Vec::new();
        let mut check = InputCheck::new(work.clone(), layout);
        let mut next_shard = 0u64;
        let mut kept_names = std::collections::HashSet::new();
        for entry in earlier.entries {
            let shard_path = work.join(&entry.name);
            next_shard = next_shard.max(journal::shard_number(&entry.name).unwrap_or(0) + 1);
            match verify_shard(&shard_path, layout, &entry, &mut seen) {
                Ok(runs) => {
                    resume_info.sequences_done += entry.records;
                    kept_names.insert(entry.name.clone());
                    check.add_shard(&entry, &runs);
                    shards.push(entry);
                }
                Err(OutputError::Duplicate { index, id }) => {
                    return Err(OutputError::CorruptShard {
                        path: shard_path,
                        message: format!(
                            "sequence index {index} ({id}) is also in another shard; the working \
                             files are inconsistent"
                        ),
                    });
                }
                Err(e) => resume_info.discarded.push((shard_path, e.to_string())),
            }
        }
        if earlier.damaged_lines > 0 {
            resume_info.discarded.push((
                journal_path.clone(),
                format!(
                    "{} incomplete or damaged journal lines ignored",
                    earlier.damaged_lines
                ),
            ));
        }
        // Everything not kept goes: temp files, unjournaled or corrupt shards, an old merge.
        for item in std::fs::read_dir(&work).map_err(io_err(&work))? {
            let item = item.map_err(io_err(&work))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name == LOCK || name == SETTINGS || name == JOURNAL || kept_names.contains(&name) {
                continue;
            }
            let p = item.path();
            if let Some(n) = journal::shard_number(&name) {
                next_shard = next_shard.max(n + 1);
                if !resume_info.discarded.iter().any(|(d, _)| d == &p) {
                    resume_info
                        .discarded
                        .push((p.clone(), "not in the journal (written when killed)".into()));
                }
            }
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            } else {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        resume_info.shards_kept = shards.len();
        let settings_json = serde_json::to_vec_pretty(&settings)
            .map_err(|e| OutputError::Internal(e.to_string()))?;
        if !settings_path.exists() {
            write_atomic(&work, SETTINGS, &settings_json).map_err(|e| match e {
                OutputError::Io { path, source } => OutputError::Unwritable { path, source },
                e => e,
            })?;
        }
        // The journal is rewritten with only the kept shards, so a discarded shard's line can never
        // be matched by a later file of the same name.
        let mut text = format!("{}\n", journal::HEADER);
        for entry in &shards {
            text.push_str(&entry.to_line());
        }
        write_atomic(&work, JOURNAL, text.as_bytes())?;
        let journal = OpenOptions::new()
            .append(true)
            .open(&journal_path)
            .map_err(io_err(&journal_path))?;
        let done = Arc::new(seen.snapshot());
        check.seal();
        Ok(Self {
            config,
            layout,
            work,
            journal,
            _lock: lock,
            seen,
            done,
            earlier_shards: shards.len(),
            input_check: Arc::new(check),
            shards,
            pending: Pending::default(),
            next_shard,
            resume_info,
            mean_buf: Vec::new(),
            token_buf: Vec::new(),
        })
    }

    /// Indices already durable from an earlier run: the caller skips them. A snapshot taken at
    /// [`EmbeddingWriter::open`] (run-length encoded, a few bytes per contiguous run).
    pub fn done(&self) -> Arc<dyn Fn(u64) -> bool + Send + Sync> {
        let done = Arc::clone(&self.done);
        Arc::new(move |index| done.contains(index))
    }

    /// The check that a resumed run re-reads the input the kept shards were computed from: feed it
    /// every sequence the reader passes over ([`InputCheck::check`]), then [`InputCheck::finish`].
    pub fn input_check(&self) -> Arc<InputCheck> {
        Arc::clone(&self.input_check)
    }

    /// Sequences durable in the working folder: kept from earlier runs and flushed by this one.
    pub fn sequences_durable(&self) -> u64 {
        self.shards.iter().map(|e| e.records).sum()
    }

    /// What the earlier run left and what was kept.
    pub fn resume_info(&self) -> &ResumeInfo {
        &self.resume_info
    }

    /// Working directory (`<path>.partial`).
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// Buffers one pack: `mean` is `B × H` row-major for the pack's `B` sequences; `token_states` is
    /// the pack's `[T, H]` per-token states with its `cu_seqlens` (`<cls>` and `<eos>` included; they
    /// are dropped). Token states are ignored unless the output was opened with `per_token`.
    ///
    /// Each row's input digest is taken from its id and length only; a caller that has the tokens
    /// uses [`EmbeddingWriter::write_pack_with_digests`], so that a resume can check the input.
    pub fn write_pack(
        &mut self,
        sequences: &[SequenceMeta],
        mean: &[f32],
        token_states: Option<(&[f32], &[i32])>,
    ) -> Result<(), OutputError> {
        let digests: Vec<u64> = sequences
            .iter()
            .map(|m| virnuc_core::sequence_digest(&m.id, [m.residues]))
            .collect();
        self.write_pack_with_digests(sequences, &digests, mean, token_states)
    }

    /// [`EmbeddingWriter::write_pack`] with each sequence's input digest
    /// ([`virnuc_core::sequence_digest`] of its id and tokens).
    pub fn write_pack_with_digests(
        &mut self,
        sequences: &[SequenceMeta],
        digests: &[u64],
        mean: &[f32],
        token_states: Option<(&[f32], &[i32])>,
    ) -> Result<(), OutputError> {
        let h = self.layout.hidden;
        if digests.len() != sequences.len() {
            return Err(OutputError::Pack {
                message: format!(
                    "{} digests for {} sequences",
                    digests.len(),
                    sequences.len()
                ),
            });
        }
        let b = sequences.len();
        if mean.len() != b * h {
            return Err(OutputError::Pack {
                message: format!(
                    "{b} sequences with hidden size {h} need {} mean values, got {}",
                    b * h,
                    mean.len()
                ),
            });
        }
        let states = if self.layout.per_token {
            let (states, cu) = token_states.ok_or_else(|| OutputError::Pack {
                message: "per-token output was asked for but the pack has no token states".into(),
            })?;
            check_cu_seqlens(sequences, states, cu, h)?;
            Some((states, cu))
        } else {
            None
        };
        // Everything is checked before anything is recorded: a refused pack leaves no trace.
        let mut in_pack = IndexSet::new();
        for seq in sequences {
            if seq.id.contains('\0') {
                return Err(OutputError::InvalidId {
                    index: seq.index,
                    id: seq.id.clone(),
                });
            }
            if self.seen.contains(seq.index) || in_pack.insert(seq.index).is_err() {
                return Err(OutputError::Duplicate {
                    index: seq.index,
                    id: seq.id.clone(),
                });
            }
        }
        for (i, seq) in sequences.iter().enumerate() {
            self.seen
                .insert(seq.index)
                .map_err(|index| OutputError::Internal(format!("index {index} checked twice")))?;
            encode_row(
                &mean[i * h..(i + 1) * h],
                self.layout.dtype,
                &mut self.mean_buf,
            );
            let tokens = match states {
                Some((states, cu)) => {
                    // Residue rows only: skip `<cls>` at cu[i] and `<eos>` at cu[i + 1] - 1.
                    let first = cu[i] as usize + 1;
                    let rows = seq.residues as usize;
                    encode_row(
                        &states[first * h..(first + rows) * h],
                        self.layout.dtype,
                        &mut self.token_buf,
                    );
                    Some(&self.token_buf[..])
                }
                None => None,
            };
            self.pending.push(seq, digests[i], &self.mean_buf, tokens);
            if self.pending.len() >= self.config.shard_sequences
                || self.pending.bytes() >= MAX_SHARD_BYTES
            {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Makes everything buffered durable now (one shard). `write_pack` and `finish` call it; call it
    /// yourself before a planned stop.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let name = journal::shard_name(self.next_shard);
        self.next_shard += 1;
        let tmp = self.work.join(format!("{name}.tmp"));
        let path = self.work.join(&name);
        let digest = self.pending.digest();
        let header = match self.pending.write_to(&tmp, self.layout) {
            Ok(h) => h,
            Err(e) => {
                // A full disk leaves no half shard holding the space.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.work)?;
        let entry = journal::Entry {
            name,
            records: header.records,
            token_rows: header.token_rows,
            payload_len: header.payload_len,
            payload_crc: header.payload_crc,
            digest,
        };
        let journal_path = self.work.join(JOURNAL);
        // One write call per line: a kill leaves the line whole or torn, and a torn line is ignored.
        self.journal
            .write_all(entry.to_line().as_bytes())
            .map_err(io_err(&journal_path))?;
        self.journal.sync_data().map_err(io_err(&journal_path))?;
        self.shards.push(entry);
        Ok(())
    }

    /// Flushes, checks that exactly the indices `0..expected_sequences` were written, merges the
    /// shards into the final file (temp name, then atomic rename) and removes the working files.
    ///
    /// When writing the final file fails (a full disk), its temp file and the merge scratch are
    /// removed and the shards stay: [`OutputError::Finish`] says to run again with `resume`.
    pub fn finish(mut self, expected_sequences: u64) -> Result<FinishSummary, OutputError> {
        self.flush()?;
        let scratch = self.work.join(SCRATCH);
        let mut tmp_name = self
            .config
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        tmp_name.push(".tmp");
        let tmp = self.work.join(tmp_name);
        match self.finish_inner(expected_sequences, &scratch, &tmp) {
            Ok(summary) => Ok(summary),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_dir_all(&scratch);
                match e {
                    e @ (OutputError::Missing { .. } | OutputError::OutOfRange { .. }) => Err(e),
                    e => Err(OutputError::Finish {
                        work: self.work.clone(),
                        sequences: self.sequences_durable(),
                        source: Box::new(e),
                    }),
                }
            }
        }
    }

    /// Stops a run that failed: flushes what is buffered (the work done so far stays for a
    /// `resume`), or removes the working folder when nothing at all is durable in it. Returns the
    /// sequences kept.
    pub fn stop(mut self) -> u64 {
        let _ = self.flush();
        let kept = self.sequences_durable();
        if kept == 0 {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        kept
    }

    /// Stops a resumed run whose input turned out not to be the interrupted run's: the shards this
    /// run wrote are removed and the journal lists only the earlier ones, so the working folder
    /// is as the interrupted run left it.
    pub fn abandon(mut self) -> Result<(), OutputError> {
        self.pending = Pending::default();
        let earlier: Vec<journal::Entry> = self.shards[..self.earlier_shards].to_vec();
        let mut text = format!("{}\n", journal::HEADER);
        for entry in &earlier {
            text.push_str(&entry.to_line());
        }
        write_atomic(&self.work, JOURNAL, text.as_bytes())?;
        for entry in &self.shards[self.earlier_shards..] {
            let p = self.work.join(&entry.name);
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
        if earlier.is_empty() {
            std::fs::remove_dir_all(&self.work).map_err(io_err(&self.work))?;
        }
        Ok(())
    }

    fn finish_inner(
        &mut self,
        expected_sequences: u64,
        scratch: &Path,
        tmp: &Path,
    ) -> Result<FinishSummary, OutputError> {
        if let Some(max) = self.seen.max()
            && max >= expected_sequences
        {
            return Err(OutputError::OutOfRange {
                index: max,
                expected: expected_sequences,
            });
        }
        if let Some(index) = self.seen.first_missing(expected_sequences) {
            return Err(OutputError::Missing {
                index,
                missing: expected_sequences - self.seen.len(),
                expected: expected_sequences,
            });
        }
        if scratch.exists() {
            std::fs::remove_dir_all(scratch).map_err(io_err(scratch))?;
        }
        std::fs::create_dir(scratch).map_err(io_err(scratch))?;
        let shard_paths: Vec<PathBuf> = self
            .shards
            .iter()
            .map(|e| self.work.join(&e.name))
            .collect();
        let token_rows: u64 = self.shards.iter().map(|e| e.token_rows).sum();
        let runs = merge::reduce(shard_paths, scratch, self.layout)?;
        let written = merge::write_final(
            tmp,
            &runs,
            self.layout,
            &self.config.attributes,
            expected_sequences,
            token_rows,
        )?;
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(tmp))?;
        let path = self.config.path.clone();
        std::fs::rename(tmp, &path).map_err(io_err(&path))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        sync_dir(&parent)?;
        let bytes = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        std::fs::remove_dir_all(&self.work).map_err(io_err(&self.work))?;
        Ok(FinishSummary {
            path,
            sequences: expected_sequences,
            token_rows: written.token_rows,
            shards: self.shards.len(),
            bytes,
        })
    }
}

fn validate(config: &OutputConfig) -> Result<(), OutputError> {
    let invalid = |message: String| Err(OutputError::InvalidConfig { message });
    if config.hidden_size == 0 || u32::try_from(config.hidden_size).is_err() {
        return invalid(format!("hidden size {}", config.hidden_size));
    }
    if config.shard_sequences == 0 {
        return invalid("shard_sequences must be at least 1".into());
    }
    let mut keys = std::collections::HashSet::new();
    for (key, value) in &config.attributes {
        if key.is_empty() || key.contains('\0') || key.contains('/') || key == "." {
            return invalid(format!("attribute name {key:?}"));
        }
        if value.contains('\0') {
            return invalid(format!("attribute {key}: value contains NUL"));
        }
        if !keys.insert(key.as_str()) {
            return invalid(format!("attribute {key} given twice"));
        }
    }
    Ok(())
}

/// First setting that differs, named for the error message.
fn mismatch(previous: &Settings, now: &Settings) -> Option<String> {
    if previous.format != now.format {
        return Some(format!(
            "working-file format ({} vs {})",
            previous.format, now.format
        ));
    }
    if previous.hidden_size != now.hidden_size {
        return Some(format!(
            "hidden size ({} then, {} now)",
            previous.hidden_size, now.hidden_size
        ));
    }
    if previous.dtype != now.dtype {
        return Some(format!(
            "dtype ({:?} then, {:?} now)",
            previous.dtype, now.dtype
        ));
    }
    if previous.per_token != now.per_token {
        return Some(format!(
            "per-token output ({} then, {} now)",
            previous.per_token, now.per_token
        ));
    }
    if previous.attributes != now.attributes {
        let key = previous
            .attributes
            .iter()
            .zip(&now.attributes)
            .find(|(a, b)| a != b)
            .map(|(a, b)| {
                if a.0 == b.0 {
                    a.0.clone()
                } else {
                    format!("{} / {}", a.0, b.0)
                }
            })
            .unwrap_or_else(|| "the number of attributes".into());
        return Some(format!("attribute {key}"));
    }
    None
}

fn check_cu_seqlens(
    sequences: &[SequenceMeta],
    states: &[f32],
    cu: &[i32],
    h: usize,
) -> Result<(), OutputError> {
    let pack = |message: String| Err(OutputError::Pack { message });
    if cu.len() != sequences.len() + 1 || cu.first() != Some(&0) {
        return pack(format!(
            "cu_seqlens has {} entries for {} sequences (must start at 0)",
            cu.len(),
            sequences.len()
        ));
    }
    for (i, seq) in sequences.iter().enumerate() {
        let tokens = i64::from(cu[i + 1]) - i64::from(cu[i]);
        if tokens != i64::from(seq.residues) + 2 {
            return pack(format!(
                "sequence {} ({}) has {} residues but {tokens} tokens in cu_seqlens (expected \
                 residues + 2 for <cls> and <eos>)",
                seq.index, seq.id, seq.residues
            ));
        }
    }
    let total = cu[sequences.len()] as usize;
    if states.len() != total * h {
        return pack(format!(
            "token states hold {} values, cu_seqlens says {total} tokens × {h}",
            states.len()
        ));
    }
    Ok(())
}

/// Reads a journaled shard completely (checksum included) and adds its indices to `seen`.
fn verify_shard(
    path: &Path,
    layout: Layout,
    entry: &journal::Entry,
    seen: &mut IndexSet,
) -> Result<Vec<(u64, u64)>, OutputError> {
    let reader = ShardReader::open(path, layout, 1 << 20)?;
    if reader.header.records != entry.records
        || reader.header.payload_len != entry.payload_len
        || reader.header.payload_crc != entry.payload_crc
        || reader.header.token_rows != entry.token_rows
    {
        return Err(OutputError::CorruptShard {
            path: path.to_path_buf(),
            message: "header differs from its journal line".into(),
        });
    }
    // Indices are added tentatively; a shard that turns out corrupt must not count.
    let mut mine = IndexSet::new();
    let mut duplicate = None;
    let mut in_order = true;
    let mut last = None;
    let mut digest = 0u64;
    reader.scan(|head| {
        digest = shard::combine(digest, head.index, head.digest);
        if last.is_some_and(|l| head.index <= l) {
            in_order = false;
        }
        last = Some(head.index);
        if duplicate.is_none() && (seen.contains(head.index) || mine.insert(head.index).is_err()) {
            duplicate = Some((head.index, head.id.clone()));
        }
    })?;
    if !in_order {
        return Err(OutputError::CorruptShard {
            path: path.to_path_buf(),
            message: "records are not sorted by index".into(),
        });
    }
    if let Some((index, id)) = duplicate {
        return Err(OutputError::Duplicate { index, id });
    }
    if digest != entry.digest {
        return Err(OutputError::CorruptShard {
            path: path.to_path_buf(),
            message: "input digests differ from its journal line".into(),
        });
    }
    let runs: Vec<(u64, u64)> = mine.runs().collect();
    for &(start, end) in &runs {
        seen.insert_run(start, end)
            .map_err(|index| OutputError::Internal(format!("index {index} checked twice")))?;
    }
    Ok(runs)
}

/// Opens and takes the working folder's lock file; a lock held by a live run names its owner.
fn take_lock(work: &Path) -> Result<File, OutputError> {
    let path = work.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| OutputError::Unwritable {
            path: path.clone(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => {
            let owner = std::fs::read_to_string(&path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "owner unknown".into());
            Err(OutputError::Locked {
                work: work.to_path_buf(),
                owner,
            })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(OutputError::Io { path, source }),
    }
}

/// Records who holds the lock (`pid N on HOST`), for the message another run gets.
fn write_owner(lock: &mut File, work: &Path) -> Result<(), OutputError> {
    use std::io::Seek;
    let path = work.join(LOCK);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".into());
    let text = format!("pid {} on {host}\n", std::process::id());
    lock.set_len(0)
        .and_then(|()| lock.seek(std::io::SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| lock.write_all(text.as_bytes()))
        .map_err(io_err(&path))
}

/// What an interrupted run's working folder holds, for the message of a run without `resume`.
fn describe_work(work: &Path) -> String {
    match journal::read(&work.join(JOURNAL)) {
        Ok(parsed) => {
            let n: u64 = parsed.entries.iter().map(|e| e.records).sum();
            format!(
                "{n} sequences done in {} shards, not in use by any running process",
                parsed.entries.len()
            )
        }
        Err(_) => "no usable journal, not in use by any running process".into(),
    }
}

/// A resumed run's check that it re-reads the input the kept shards were computed from.
///
/// Every kept shard's journal line holds the combined digest of its rows' inputs. The caller
/// feeds each sequence it passes over ([`InputCheck::check`], in any order); when all of a shard's
/// sequences have been seen, their digest must equal the journaled one. On a mismatch the shard
/// file is read once more to name the first sequence that differs. Memory: the ids of the shards
/// being checked, a few at a time (packs are made from a sliding window of the input).
#[derive(Debug)]
pub struct InputCheck {
    work: PathBuf,
    layout: Layout,
    /// (first index, end index, shard slot), sorted by first index.
    runs: Vec<(u64, u64, usize)>,
    state: std::sync::Mutex<CheckState>,
}

#[derive(Debug, Default)]
struct CheckState {
    shards: Vec<ShardCheck>,
    verified: usize,
    failed: bool,
}

#[derive(Debug)]
struct ShardCheck {
    name: String,
    records: u64,
    digest: u64,
    seen: u64,
    sum: u64,
    /// (index, digest, id, tag) seen so far, for the message of a mismatch; dropped once
    /// verified.
    observed: Vec<(u64, u64, String, u32)>,
}

impl InputCheck {
    fn new(work: PathBuf, layout: Layout) -> Self {
        Self {
            work,
            layout,
            runs: Vec::new(),
            state: Default::default(),
        }
    }

    fn add_shard(&mut self, entry: &journal::Entry, runs: &[(u64, u64)]) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let slot = state.shards.len();
        state.shards.push(ShardCheck {
            name: entry.name.clone(),
            records: entry.records,
            digest: entry.digest,
            seen: 0,
            sum: 0,
            observed: Vec::new(),
        });
        self.runs.extend(runs.iter().map(|&(a, b)| (a, b, slot)));
    }

    fn seal(&mut self) {
        self.runs.sort_unstable();
    }

    fn slot(&self, index: u64) -> Option<usize> {
        let at = self.runs.partition_point(|r| r.0 <= index);
        let (_, end, slot) = *self.runs.get(at.checked_sub(1)?)?;
        (index < end).then_some(slot)
    }

    /// Whether an earlier run already wrote output index `index`.
    pub fn is_done(&self, index: u64) -> bool {
        self.slot(index).is_some()
    }

    /// Sequences the kept shards hold.
    pub fn sequences_done(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.shards.iter().map(|s| s.records).sum()
    }

    /// Notes sequence `index` (`id`, input digest `digest`, the caller's `tag`: its input file)
    /// as re-read now. Returns whether it is done already; an error when it completes a shard
    /// whose input differs (naming the first differing sequence, with its tag).
    pub fn check(&self, index: u64, id: &str, digest: u64, tag: u32) -> Result<bool, OutputError> {
        let Some(slot) = self.slot(index) else {
            return Ok(false);
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed {
            return Ok(true);
        }
        let shard = &mut state.shards[slot];
        shard.seen += 1;
        shard.sum = shard::combine(shard.sum, index, digest);
        shard.observed.push((index, digest, id.to_string(), tag));
        if shard.seen < shard.records {
            return Ok(true);
        }
        if shard.seen == shard.records && shard.sum == shard.digest {
            shard.observed = Vec::new();
            state.verified += 1;
            return Ok(true);
        }
        state.failed = true;
        let observed = std::mem::take(&mut state.shards[slot].observed);
        let name = state.shards[slot].name.clone();
        Err(self.explain(&name, &observed))
    }

    /// After the last sequence: every kept shard must have been seen whole.
    pub fn finish(&self) -> Result<(), OutputError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed || state.verified == state.shards.len() {
            return Ok(());
        }
        state.failed = true;
        let Some(slot) = state.shards.iter().position(|s| s.seen != s.records) else {
            return Ok(());
        };
        let observed = std::mem::take(&mut state.shards[slot].observed);
        let name = state.shards[slot].name.clone();
        Err(self.explain(&name, &observed))
    }

    /// Names the first sequence of shard `name` whose input differs from what was `observed`.
    fn explain(&self, name: &str, observed: &[(u64, u64, String, u32)]) -> OutputError {
        let path = self.work.join(name);
        let mut now: std::collections::HashMap<u64, (u64, &str, u32)> = observed
            .iter()
            .map(|(i, d, id, t)| (*i, (*d, id.as_str(), *t)))
            .collect();
        let mut tag = None;
        let mut first: Option<String> = None;
        let scanned = ShardReader::open(&path, self.layout, 1 << 20).and_then(|r| {
            r.scan(|head| {
                if first.is_some() {
                    return;
                }
                let seen = now.remove(&head.index);
                tag = seen.map(|s| s.2);
                first = match seen {
                    None => Some(format!(
                        "the input ends before sequence {} (`{}`), which the interrupted run \
                         embedded",
                        head.index, head.id
                    )),
                    Some((_, id, _)) if id != head.id => Some(format!(
                        "sequence {} is `{id}` now but was `{}` (records reordered, inserted or \
                         removed)",
                        head.index, head.id
                    )),
                    Some((d, id, _)) if d != head.digest => Some(format!(
                        "sequence {} (`{id}`) has other residues than when it was embedded (the \
                         record was edited)",
                        head.index
                    )),
                    Some(_) => None,
                }
            })
        });
        let message = match (first, scanned) {
            (Some(m), _) => m,
            (None, Err(e)) => format!("cannot read back {}: {e}", path.display()),
            (None, Ok(_)) => format!("the sequences of {} differ", path.display()),
        };
        OutputError::InputChanged {
            work: self.work.clone(),
            message,
            tag,
        }
    }
}
