//! FASTA/FASTQ in, packed ESM-2 batches out: the CPU side of virnuc-trt.
//!
//! ```text
//!  inputs ─► reader thread (needletail) ─► worker threads: chunk → six-frame translate → tokenize
//!        ─► packer thread: reorder by sequence number, FFD over a sliding window ─► prefetch queue ─► you
//! ```
//!
//! Every channel is bounded and the number of record batches in flight is capped, so memory stays
//! bounded whatever the input size and a slow consumer slows the reader down (back-pressure). Output
//! indices and pack contents depend only on the input and the configuration, never on the number of
//! workers.
//!
//! Modules, one per concern: [`loader`] (reading records), [`chunk`] (VirNucPro's chunking),
//! [`translate`] (six-frame translation), [`tokenize`] (ESM-2 alphabet and long sequences), [`pack`]
//! (FFD packer), [`report`] (run report), [`pipeline`] (threads and the public entry points).
//!
//! ```
//! use std::io::Write;
//! let mut f = tempfile::NamedTempFile::new().unwrap();
//! writeln!(f, ">contig1\nATGGCCAAAGGGTTTCCCATGGCC").unwrap();
//! let config = virnuc_data::PipelineConfig {
//!     inputs: vec![f.path().to_path_buf()],
//!     ..Default::default()
//! };
//! let mut pipeline = virnuc_data::start(config).unwrap();
//! let packs: Vec<_> = pipeline.by_ref().collect::<Result<_, _>>().unwrap();
//! let report = pipeline.finish().unwrap();
//! report.check_accounting().unwrap();
//! assert_eq!(packs[0].sequences[0].id, "contig1_chunk_1F1");
//! ```

pub mod chunk;
pub mod loader;
pub mod pack;
pub mod pipeline;
pub mod report;
pub mod tokenize;
pub mod translate;

use std::path::PathBuf;
use std::sync::Arc;

pub use loader::{Input, InputProgress};
pub use pipeline::{Pipeline, ProteinRecord, Proteins, TaggedPack, proteins, proteins_from, start};
pub use report::RunReport;
pub use tokenize::{Encoder, LongPolicy};

/// What the inputs hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// DNA: VirNucPro chunking, six-frame translation, stop-free frames kept.
    #[default]
    Nucleotide,
    /// Proteins, straight to the tokenizer.
    Protein,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nucleotide => "nucleotide",
            Mode::Protein => "protein",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nucleotide" => Ok(Self::Nucleotide),
            "protein" => Ok(Self::Protein),
            other => Err(format!("unknown mode {other:?} (nucleotide|protein)")),
        }
    }
}

/// What a resumed run knows about the work an interrupted run left (the output writer implements
/// it). The packer still packs every sequence, so packs are the same as in an uninterrupted run;
/// it asks [`ResumeCheck::check`] about each, drops packs whose sequences are all done, and calls
/// [`ResumeCheck::finish`] after the last one.
pub trait ResumeCheck: Send + Sync {
    /// Output index `index` was written by the interrupted run.
    fn is_done(&self, index: u64) -> bool;
    /// Notes sequence `index` (`id`, [`virnuc_core::sequence_digest`] `digest`, read from input
    /// number `file`) as re-read; returns whether it is done. `Err` says how the input differs
    /// from the one the interrupted run read.
    fn check(&self, index: u64, id: &str, digest: u64, file: u32) -> Result<bool, ResumeMismatch>;
    /// After the last sequence: `Err` if the input ended before all done work was re-read.
    fn finish(&self) -> Result<(), ResumeMismatch>;
}

/// How a re-read input differs from an interrupted run's: the input number of the first
/// differing sequence (when known) and what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeMismatch {
    pub file: Option<u32>,
    pub message: String,
}

/// A shared [`ResumeCheck`].
pub type SkipFn = Arc<dyn ResumeCheck>;

/// One of `count` disjoint parts of the input, for one process per GPU or a scheduler's job array:
/// shard `index` takes the records whose 0-based position in the input (all files, in order) is
/// `index` modulo `count`. Round-robin by record keeps the shards balanced whatever the order of
/// the input, and keeps every chunk and frame of a record in the same shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShard {
    pub index: u64,
    pub count: u64,
}

impl InputShard {
    /// Whether the record at 0-based input position `ordinal` belongs to this shard.
    pub fn takes(self, ordinal: u64) -> bool {
        ordinal % self.count == self.index
    }

    /// 0 ≤ index < count (which also rules out count = 0).
    pub fn is_valid(self) -> bool {
        self.index < self.count
    }
}

impl std::fmt::Display for InputShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Written and read as its `I/N` text (run reports, YAML run configs).
impl serde::Serialize for InputShard {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for InputShard {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for InputShard {
    type Err = String;
    /// `I/N` with 0 ≤ I < N (`0/4` … `3/4`; a Slurm array task passes `$SLURM_ARRAY_TASK_ID/N`).
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("input shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(usage)?;
        let shard = Self {
            index: i.trim().parse().map_err(|_| usage())?,
            count: n.trim().parse().map_err(|_| usage())?,
        };
        if shard.is_valid() {
            Ok(shard)
        } else {
            Err(usage())
        }
    }
}

/// Everything [`start`] needs.
#[derive(Clone)]
pub struct PipelineConfig {
    /// FASTA/FASTQ files, plain or compressed; `-` is standard input.
    pub inputs: Vec<PathBuf>,
    pub mode: Mode,
    /// Skip the check that the first letters of each file fit `mode` ([`loader::ModeCheck`]).
    pub force_mode: bool,
    /// Nucleotide chunk length (VirNucPro: 300 or 500).
    pub chunk_len: usize,
    /// Drop residues of ambiguous codons as VirNucPro does, instead of translating them to `X`.
    pub virnucpro_compat: bool,
    /// Residues per sequence, `<cls>`/`<eos>` excluded (fair-esm truncates at 1022).
    pub max_residues: usize,
    pub long: LongPolicy,
    /// Tokens per pack, special tokens included.
    pub token_budget: usize,
    pub max_seqs_per_pack: Option<usize>,
    /// Sequences considered together by the packer.
    pub window: usize,
    /// Translation/tokenization threads; 0 = available parallelism.
    pub workers: usize,
    /// Packs ready ahead of the consumer.
    pub prefetch: usize,
    /// Work of an interrupted run (resume): checked against the input, counted; packs whose
    /// sequences are all done are not delivered.
    pub skip: Option<SkipFn>,
    /// Only this shard's records (`None`: all of them). Honoured by [`start`]; the sequential
    /// [`proteins`] view refuses it.
    pub input_shard: Option<InputShard>,
    /// The models the sequences go to, each as its family's [`Encoder`] (default: ESM-2). Each
    /// encoder gets its own packs of the same sequences, with the same output indices: a kept frame's
    /// protein for ESM-2, its DNA span for DNABERT-S (`predict` runs both; `embed` one).
    pub encoders: Vec<Arc<Encoder>>,
}

impl std::fmt::Debug for PipelineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineConfig")
            .field("inputs", &self.inputs)
            .field("mode", &self.mode)
            .field("force_mode", &self.force_mode)
            .field("chunk_len", &self.chunk_len)
            .field("virnucpro_compat", &self.virnucpro_compat)
            .field("max_residues", &self.max_residues)
            .field("long", &self.long)
            .field("token_budget", &self.token_budget)
            .field("max_seqs_per_pack", &self.max_seqs_per_pack)
            .field("window", &self.window)
            .field("workers", &self.workers)
            .field("prefetch", &self.prefetch)
            .field("skip", &self.skip.as_ref().map(|_| "fn"))
            .field("input_shard", &self.input_shard)
            .field(
                "encoders",
                &self.encoders.iter().map(|e| e.family()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            mode: Mode::Nucleotide,
            force_mode: false,
            chunk_len: 500,
            virnucpro_compat: false,
            max_residues: 1022,
            long: LongPolicy::Truncate,
            token_budget: 16384,
            max_seqs_per_pack: None,
            window: 4096,
            workers: 0,
            prefetch: 4,
            skip: None,
            input_shard: None,
            encoders: vec![Arc::new(Encoder::esm2())],
        }
    }
}

impl PipelineConfig {
    /// Rejects settings the pipeline cannot run with.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: &str| Err(DataError::Config(m.to_string()));
        if self.inputs.is_empty() {
            return bad("no input files");
        }
        if self.chunk_len < 3 {
            return bad("chunk_len must be at least 3 (one codon)");
        }
        if self.max_residues == 0 {
            return bad("max_residues must be positive");
        }
        if self.token_budget == 0 || self.window == 0 || self.prefetch == 0 {
            return bad("token_budget, window and prefetch must be positive");
        }
        if self.max_seqs_per_pack == Some(0) {
            return bad("max_seqs_per_pack must be positive");
        }
        if self.input_shard.is_some_and(|s| !s.is_valid()) {
            return bad("input shard index must be below the shard count");
        }
        if self.encoders.is_empty() {
            return bad("no model to tokenize for");
        }
        for e in &self.encoders {
            let t = e.traits();
            if self.mode == Mode::Protein && !t.reads_proteins {
                return Err(DataError::Config(format!(
                    "protein inputs cannot go to a {} model: it embeds the DNA of each kept frame \
                     (give nucleotide inputs, --mode nucleotide)",
                    e.family()
                )));
            }
            if self.long == LongPolicy::Split && t.frame_input == virnuc_core::FrameInput::DnaSpan {
                return Err(DataError::Config(format!(
                    "--long split cuts proteins into windows; a {} model takes each frame's DNA \
                     whole (use truncate or skip)",
                    e.family()
                )));
            }
        }
        Ok(())
    }
}

/// Errors of the data path. Input errors name the file and the 1-based record number.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {file}: {message}")]
    Open { file: String, message: String },
    #[error("{file}: record {record}{}: {message}", id.as_ref().map(|i| format!(" ('{i}')")).unwrap_or_default())]
    Record {
        file: String,
        record: u64,
        id: Option<String>,
        message: String,
    },
    /// The first letters of a file do not fit the mode (see [`loader::ModeCheck`]).
    #[error("{file}: {message}")]
    Mode { file: String, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    /// A sequence the model's tokenizer refused (names the output sequence).
    #[error("cannot tokenize {id}: {message}")]
    Encode { id: String, message: String },
    #[error("the {0} thread panicked")]
    Panic(&'static str),
    /// A resumed run re-reads an input that is not the one the interrupted run read.
    #[error("{file}: {message}")]
    InputChanged { file: String, message: String },
    /// Returned by [`Pipeline::finish`] when the run hit an error; the report shows how far it got.
    #[error("run failed: {first}")]
    RunFailed {
        first: String,
        report: Box<RunReport>,
    },
}
