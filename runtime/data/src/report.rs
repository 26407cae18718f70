//! The run report: every record, chunk, frame and sequence accounted for.

use serde::{Deserialize, Serialize};

use crate::pack::PackStats;

/// Records read from one input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    pub path: String,
    pub records: u64,
    /// Bases or residues read (line breaks excluded).
    pub residues: u64,
    /// The input had no record at all (counted, not an error: sharded inputs may have empty shards).
    pub empty: bool,
}

/// Counters of the per-record stages (chunking, translation, tokenizing); merged in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStats {
    /// Records with a sequence that went through the stages.
    pub records_processed: u64,
    /// Nucleotide mode: chunks cut (`ceil(L / chunk_len)` per record).
    pub chunks: u64,
    /// Nucleotide mode: frames translated (6 per chunk).
    pub frames: u64,
    pub frames_kept: u64,
    pub frames_dropped_stop: u64,
    /// No residue left (chunk too short, or every codon ambiguous in VirNucPro mode).
    pub frames_dropped_empty: u64,
    /// Nucleotide mode: chunks none of whose six frames was kept (they add no sequence).
    #[serde(default)]
    pub chunks_without_frame: u64,
    /// Codons with a base other than ACGT (translated to `X`, or dropped in VirNucPro mode).
    pub ambiguous_codons: u64,
    /// Protein mode: a trailing `*` removed from a protein record.
    pub terminal_stops_stripped: u64,
    /// Proteins entering the long-sequence policy (kept frames, or protein records).
    pub proteins: u64,
    /// Proteins longer than `max_residues`, by policy.
    pub long_truncated: u64,
    pub long_split: u64,
    /// Extra sequences created by splitting (windows beyond the first).
    pub split_extra_windows: u64,
    pub long_skipped: u64,
    /// Residues truncated away.
    pub residues_truncated: u64,
    /// Sequences handed to the packer stage (each gets an output index).
    pub sequences: u64,
    /// Residues or bases mapped to the unknown token (`<unk>`, `[UNK]`), over all models of the run.
    pub unknown_residues: u64,
}

impl StageStats {
    pub fn add(&mut self, o: &StageStats) {
        self.records_processed += o.records_processed;
        self.chunks += o.chunks;
        self.frames += o.frames;
        self.frames_kept += o.frames_kept;
        self.frames_dropped_stop += o.frames_dropped_stop;
        self.frames_dropped_empty += o.frames_dropped_empty;
        self.chunks_without_frame += o.chunks_without_frame;
        self.ambiguous_codons += o.ambiguous_codons;
        self.terminal_stops_stripped += o.terminal_stops_stripped;
        self.proteins += o.proteins;
        self.long_truncated += o.long_truncated;
        self.long_split += o.long_split;
        self.split_extra_windows += o.split_extra_windows;
        self.long_skipped += o.long_skipped;
        self.residues_truncated += o.residues_truncated;
        self.sequences += o.sequences;
        self.unknown_residues += o.unknown_residues;
    }
}

/// Everything a run did, as JSON (`serde_json::to_string_pretty(&report)`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `nucleotide` or `protein`.
    pub mode: String,
    pub chunk_len: usize,
    pub virnucpro_compat: bool,
    pub max_residues: usize,
    pub long_policy: crate::LongPolicy,
    pub token_budget: usize,
    pub files: Vec<FileReport>,
    pub records_read: u64,
    /// Records with an empty sequence: skipped (VirNucPro would divide by zero on them).
    pub records_empty: u64,
    /// `I/N` when the run took one shard of the input; the records of the other shards are read
    /// (to know their positions) and counted here, nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_shard: Option<crate::InputShard>,
    #[serde(default)]
    pub records_other_shards: u64,
    /// Records whose id repeats an earlier id (exact up to 64-bit hash collisions); processed anyway,
    /// output indices stay unique.
    pub duplicate_ids: u64,
    /// Ids held for the duplicate check: it stops after `DUPLICATE_CHECK_CAP` distinct ids to keep
    /// memory bounded (about 16 MB); then `duplicate_check_capped` is true.
    pub duplicate_check_capped: bool,
    /// Record ids that were not valid UTF-8 (replacement characters substituted).
    pub non_utf8_ids: u64,
    /// Records whose header has no id (output names start with `_chunk_` or are empty).
    #[serde(default)]
    pub empty_ids: u64,
    /// Spaces, tabs and carriage returns removed from inside FASTA sequence lines (as Biopython does).
    #[serde(default)]
    pub whitespace_removed: u64,
    pub stages: StageStats,
    /// Resume: sequences an interrupted run wrote already (checked against the input, not
    /// written again). They are still packed, so `packing` describes every pack of the input,
    /// the same as in an uninterrupted run.
    pub skipped_resume: u64,
    /// Resume: packs made but not delivered because all their sequences were done.
    #[serde(default)]
    pub packs_skipped_resume: u64,
    /// Packing of the (first) model's packs.
    pub packing: PackStats,
    /// A run feeding several models (`predict`): the packing of the others, in encoder order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packing_other_models: Vec<PackStats>,
    /// `tokens / (tokens + unused_budget)`.
    pub utilization: f64,
    /// Errors that ended the run early (input errors name file and record).
    pub errors: Vec<String>,
    /// The run read every input to the end and the consumer took every pack.
    pub complete: bool,
}

/// Distinct ids remembered by the duplicate check (8-byte hashes: ~16 MB with the table overhead).
pub const DUPLICATE_CHECK_CAP: usize = 1 << 20;

impl RunReport {
    /// What the run changed or left out of the input, one phrase a non-zero counter (empty when the
    /// input went through untouched), for the one-line summary on standard error.
    pub fn alterations(&self) -> Vec<String> {
        let s = &self.stages;
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut out = Vec::new();
        let mut add = |n: u64, text: String| {
            if n > 0 {
                out.push(text);
            }
        };
        add(
            self.duplicate_ids,
            plural(self.duplicate_ids, "duplicate id", "duplicate ids"),
        );
        add(
            self.non_utf8_ids,
            format!(
                "{} with non-UTF-8 bytes replaced",
                plural(self.non_utf8_ids, "id", "ids")
            ),
        );
        add(
            self.empty_ids,
            plural(self.empty_ids, "empty id", "empty ids"),
        );
        add(
            self.records_empty,
            format!(
                "{} without sequence skipped",
                plural(self.records_empty, "record", "records")
            ),
        );
        add(
            self.whitespace_removed,
            format!(
                "{} removed from sequence lines",
                plural(self.whitespace_removed, "space/tab", "spaces/tabs")
            ),
        );
        add(
            s.long_truncated,
            format!(
                "{} truncated to {} residues ({} residues cut)",
                plural(s.long_truncated, "sequence", "sequences"),
                self.max_residues,
                s.residues_truncated
            ),
        );
        add(
            s.long_skipped,
            format!(
                "{} longer than {} residues skipped",
                plural(s.long_skipped, "sequence", "sequences"),
                self.max_residues
            ),
        );
        add(
            s.chunks_without_frame,
            format!(
                "{} with no stop-free frame (nothing embedded for them)",
                plural(s.chunks_without_frame, "chunk", "chunks")
            ),
        );
        add(
            s.unknown_residues,
            format!(
                "{} embedded as <unk>",
                plural(s.unknown_residues, "unknown residue", "unknown residues")
            ),
        );
        out
    }

    /// Checks that every record, chunk, frame and sequence is accounted for; returns the first
    /// imbalance found. Valid for complete runs (a run cut short has sequences still in flight).
    pub fn check_accounting(&self) -> Result<(), String> {
        let s = &self.stages;
        let eq = |what: &str, a: u64, b: u64| {
            if a == b {
                Ok(())
            } else {
                Err(format!("{what}: {a} != {b}"))
            }
        };
        eq(
            "records read = Σ per-file records",
            self.records_read,
            self.files.iter().map(|f| f.records).sum(),
        )?;
        eq(
            "records read = empty + processed + other shards",
            self.records_read,
            self.records_empty + s.records_processed + self.records_other_shards,
        )?;
        if self.mode == "nucleotide" {
            eq("frames = 6 × chunks", s.frames, 6 * s.chunks)?;
            eq(
                "frames = kept + stop + empty",
                s.frames,
                s.frames_kept + s.frames_dropped_stop + s.frames_dropped_empty,
            )?;
            eq("proteins = frames kept", s.proteins, s.frames_kept)?;
        } else {
            eq(
                "proteins = records processed",
                s.proteins,
                s.records_processed,
            )?;
        }
        eq(
            "sequences = proteins − skipped long + extra windows",
            s.sequences + s.long_skipped,
            s.proteins + s.split_extra_windows,
        )?;
        if !self.complete {
            return Err("run incomplete: packs still in flight".into());
        }
        for packing in std::iter::once(&self.packing).chain(&self.packing_other_models) {
            eq("sequences = packed", s.sequences, packing.sequences)?;
            if self.skipped_resume > packing.sequences {
                return Err(format!(
                    "skipped by resume: {} > {} sequences packed",
                    self.skipped_resume, packing.sequences
                ));
            }
            eq(
                "tokens = residues + 2 × sequences packed",
                packing.tokens,
                packing.residues + 2 * packing.sequences,
            )?;
        }
        if self.packs_skipped_resume > self.packing.packs {
            return Err(format!(
                "packs skipped by resume: {} > {} packs made",
                self.packs_skipped_resume, self.packing.packs
            ));
        }
        Ok(())
    }

    /// [`RunReport::check_accounting`] plus what the consumer did with the packs: `packs_run`
    /// packs taken (all delivered ones) and `sequences_written` sequences written, which with the
    /// ones skipped by resume must be every sequence.
    pub fn check_consumer(&self, packs_run: u64, sequences_written: u64) -> Result<(), String> {
        self.check_accounting()?;
        let packs = self.packing.packs - self.packs_skipped_resume;
        if packs_run != packs {
            return Err(format!(
                "packs run = packs made − packs skipped by resume: {packs_run} != {packs}"
            ));
        }
        if sequences_written + self.skipped_resume != self.stages.sequences {
            return Err(format!(
                "sequences written + skipped by resume = sequences: {sequences_written} + {} != {}",
                self.skipped_resume, self.stages.sequences
            ));
        }
        Ok(())
    }
}
