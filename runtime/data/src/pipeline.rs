//! The threads: reader → workers → packer → prefetch queue, and the sequential [`proteins`] view.
//!
//! * The reader groups records into batches of about [`BATCH_BYTES`] of sequence, numbers them, and
//!   may only send a batch after taking a ticket; the packer returns a ticket for each batch it
//!   consumes in order. At most `tickets` batches are thus in flight anywhere (work queue, workers,
//!   reorder buffer), which bounds memory even when one worker is slow on a huge record.
//! * Workers chunk, translate and tokenize a batch and send it back with its number. Each sequence
//!   (a kept frame, or a protein record) is tokenized once per [`Encoder`] of the run: with the
//!   family's tokenizer, from what the family takes of a frame (its protein or its DNA span).
//! * The packer reorders batches by number, assigns output indices in input order, applies the resume
//!   predicate, packs — one packer per encoder, so a sequence has the same output index in every
//!   encoder's packs — and sends packs, tagged with their encoder, to the bounded prefetch queue.
//! * An input error travels as a numbered batch too: packs of every earlier record are delivered
//!   first, then the error, then the iterator ends.
//! * Dropping the [`Pipeline`] (or calling [`Pipeline::finish`] early) closes the prefetch queue; each
//!   stage then sees its channel closed and stops.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use virnuc_core::{PackedBatch, SequenceMeta};

use crate::chunk::chunks;
use crate::loader::{Input, InputProgress, RecordRef, Source, SourceStats};
use crate::pack::{PackItem, PackStats, Packer, PackerConfig};
use crate::report::{RunReport, StageStats};
use crate::tokenize::{Encoder, LongPolicy, long_pieces};
use crate::translate::{Ambiguity, Frame, FrameOutcome, SpanRule, Translator};
use crate::{DataError, Mode, PipelineConfig};
use virnuc_core::FrameInput;

/// Sequence bytes per reader batch: large enough to amortize channel traffic, small enough that
/// a few dozen batches in flight stay in a few MB.
pub const BATCH_BYTES: usize = 256 * 1024;
const BATCH_RECORDS: usize = 4096;

/// Settings of the per-record stages.
#[derive(Debug, Clone, Copy)]
struct StageConfig {
    mode: Mode,
    chunk_len: usize,
    ambiguity: Ambiguity,
    /// Residues a protein keeps under the long-sequence policy; unbounded when no encoder takes
    /// the proteins (a DNABERT-S-only run: its DNA spans are never cut, so nothing is cut or
    /// counted as cut).
    max_residues: usize,
    long: LongPolicy,
    /// Some encoder takes DNA spans: cut them from kept frames.
    need_dna: bool,
    span: SpanRule,
}

impl From<&PipelineConfig> for StageConfig {
    fn from(c: &PipelineConfig) -> Self {
        let takes_proteins = c.mode == Mode::Protein
            || c.encoders
                .iter()
                .any(|e| e.traits().frame_input == FrameInput::Protein);
        Self {
            mode: c.mode,
            chunk_len: c.chunk_len,
            ambiguity: if c.virnucpro_compat {
                Ambiguity::Drop
            } else {
                Ambiguity::X
            },
            max_residues: if takes_proteins {
                c.max_residues
            } else {
                usize::MAX
            },
            long: c.long,
            need_dna: c
                .encoders
                .iter()
                .any(|e| e.traits().frame_input == FrameInput::DnaSpan),
            span: if c.virnucpro_compat {
                SpanRule::VirNucPro
            } else {
                SpanRule::Coded
            },
        }
    }
}

/// Per-record stages with reusable buffers: record → named sequences (protein pieces, with the DNA
/// span of their frame when asked for).
#[derive(Debug)]
struct RecordProcessor {
    config: StageConfig,
    translator: Translator,
    name: String,
    piece_name: String,
    dna: Vec<u8>,
}

/// `emit(name, protein, dna)`: one final sequence; `dna` is empty in protein mode or when no encoder
/// takes DNA.
type Emit<'a> = dyn FnMut(&str, &[u8], &[u8]) + 'a;

impl RecordProcessor {
    fn new(config: StageConfig) -> Self {
        Self {
            config,
            translator: Translator::default(),
            name: String::new(),
            piece_name: String::new(),
            dna: Vec::new(),
        }
    }

    /// Runs one non-empty record through the stages; `emit` gets each final sequence.
    fn process(
        &mut self,
        id: &str,
        seq: &[u8],
        part: Option<Part>,
        stats: &mut StageStats,
        emit: &mut Emit<'_>,
    ) {
        // A record cut into parts counts once, with its first part.
        if part.is_none_or(|p| p.first == 1) {
            stats.records_processed += 1;
        }
        let c = self.config;
        match c.mode {
            Mode::Protein => {
                let residues = match seq.split_last() {
                    Some((b'*', rest)) => {
                        stats.terminal_stops_stripped += 1;
                        rest
                    }
                    _ => seq,
                };
                let Self {
                    name, piece_name, ..
                } = self;
                name.clear();
                name.push_str(id);
                emit_pieces(name, piece_name, residues, &[], c, stats, emit);
            }
            Mode::Nucleotide => {
                let (whole_len, first, count, offset) = match part {
                    Some(p) => (p.whole_len, p.first, p.count, p.offset),
                    None => (seq.len(), 1, usize::MAX, 0),
                };
                for (k, range) in chunks(whole_len, c.chunk_len).skip(first - 1).take(count) {
                    stats.chunks += 1;
                    self.translator
                        .load(&seq[range.start - offset..range.end - offset], c.ambiguity);
                    let kept_before = stats.frames_kept;
                    for frame in Frame::ALL {
                        stats.frames += 1;
                        let (outcome, ambiguous) = self.translator.frame(frame, c.ambiguity);
                        stats.ambiguous_codons += ambiguous as u64;
                        match outcome {
                            FrameOutcome::Stop => stats.frames_dropped_stop += 1,
                            FrameOutcome::Empty => stats.frames_dropped_empty += 1,
                            FrameOutcome::Kept => {
                                stats.frames_kept += 1;
                                let Self {
                                    name,
                                    piece_name,
                                    translator,
                                    dna,
                                    ..
                                } = self;
                                name.clear();
                                // Writing to a String cannot fail.
                                let _ = write!(name, "{id}_chunk_{k}{}", frame.suffix());
                                if c.need_dna {
                                    translator.dna_span(frame, c.span, dna);
                                }
                                let dna = if c.need_dna { &dna[..] } else { &[] };
                                emit_pieces(
                                    name,
                                    piece_name,
                                    &translator.protein,
                                    dna,
                                    c,
                                    stats,
                                    emit,
                                );
                            }
                        }
                    }
                    if stats.frames_kept == kept_before {
                        stats.chunks_without_frame += 1;
                    }
                }
            }
        }
    }
}

/// Applies the long-sequence policy to one protein and emits its pieces, each with `dna` (the frame's
/// DNA span: whole, whatever the policy did to the protein; a split protein is refused by the
/// configuration when DNA is asked for).
fn emit_pieces(
    name: &str,
    piece_name: &mut String,
    residues: &[u8],
    dna: &[u8],
    c: StageConfig,
    stats: &mut StageStats,
    emit: &mut Emit<'_>,
) {
    stats.proteins += 1;
    if residues.len() > c.max_residues {
        match c.long {
            LongPolicy::Split => {
                stats.long_split += 1;
                stats.split_extra_windows += (residues.len().div_ceil(c.max_residues) - 1) as u64;
            }
            LongPolicy::Truncate => {
                stats.long_truncated += 1;
                stats.residues_truncated += (residues.len() - c.max_residues) as u64;
            }
            LongPolicy::Skip => stats.long_skipped += 1,
        }
    }
    for (range, window) in long_pieces(residues.len(), c.max_residues, c.long) {
        stats.sequences += 1;
        match window {
            Some(w) => {
                piece_name.clear();
                let _ = write!(piece_name, "{name}_w{w}");
                emit(piece_name, &residues[range], dna);
            }
            None => emit(name, &residues[range], dna),
        }
    }
}

/// Records read by the reader, owned, concatenated.
#[derive(Debug, Default)]
struct RecordBatch {
    ids: String,
    id_ends: Vec<usize>,
    seqs: Vec<u8>,
    seq_ends: Vec<usize>,
    parts: Vec<Option<Part>>,
    /// Input position of each record ([`SequenceMeta::record`]).
    ordinals: Vec<u64>,
    /// Input file of each record (index into the inputs).
    files: Vec<u32>,
}

/// Tokenized sequences of one batch, concatenated; `tokens[k]`/`token_ends[k]` are encoder `k`'s.
#[derive(Debug, Default)]
struct TokenBatch {
    ids: String,
    id_ends: Vec<usize>,
    tokens: Vec<Vec<u32>>,
    token_ends: Vec<Vec<usize>>,
    /// Input position of the record each sequence comes from.
    records: Vec<u64>,
    /// Input file of each sequence (index into the inputs).
    files: Vec<u32>,
    stats: StageStats,
}

type Work = (u64, Result<RecordBatch, DataError>);
type Done = (u64, Result<TokenBatch, DataError>);
/// A pack and the index of the encoder (model) it is for.
pub type TaggedPack = (usize, PackedBatch);

/// What the packer thread reports when it stops.
#[derive(Debug, Default)]
struct PackerOutcome {
    stages: StageStats,
    /// One per encoder.
    packing: Vec<PackStats>,
    skipped_resume: u64,
    packs_skipped_resume: u64,
    /// All batches consumed and all packs handed to the prefetch queue.
    finished: bool,
    error: Option<String>,
}

/// A running pipeline: iterate it for packs, then call [`Pipeline::finish`] for the report.
pub struct Pipeline {
    rx: Option<Receiver<Result<TaggedPack, DataError>>>,
    reader: Option<JoinHandle<(SourceStats, OtherShards)>>,
    workers: Vec<JoinHandle<()>>,
    packer: Option<JoinHandle<PackerOutcome>>,
    config: PipelineConfig,
    progress: InputProgress,
    exhausted: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .field("exhausted", &self.exhausted)
            .finish_non_exhaustive()
    }
}

/// Starts the threads. Packs come out of the returned iterator in a deterministic order.
pub fn start(config: PipelineConfig) -> Result<Pipeline, DataError> {
    config.validate()?;
    let workers = if config.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        config.workers
    };
    let tickets = 4 * workers + 4;
    let (work_tx, work_rx) = bounded::<Work>(2 * workers);
    let (done_tx, done_rx) = bounded::<Done>(tickets);
    let (ticket_tx, ticket_rx) = bounded::<()>(tickets);
    for _ in 0..tickets {
        // The channel has room for exactly `tickets` units and nobody has taken any yet.
        let _ = ticket_tx.send(());
    }
    let (pack_tx, pack_rx) = bounded(config.prefetch);

    let progress = InputProgress::for_paths(&config.inputs);
    let mut source = Source::new(config.inputs.clone()).with_progress(progress.clone());
    if !config.force_mode {
        source = source.check_mode(config.mode);
    }
    let stage = StageConfig::from(&config);
    let shard = config.input_shard;
    let reader = spawn("virnuc-reader", move || {
        reader_loop(source, stage, shard, work_tx, ticket_rx)
    })?;
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let rx = work_rx.clone();
        let tx = done_tx.clone();
        let encoders = config.encoders.clone();
        handles.push(spawn(&format!("virnuc-worker-{w}"), move || {
            worker_loop(stage, encoders, rx, tx)
        })?);
    }
    let streams = config.encoders.len();
    drop((work_rx, done_tx));
    let pack_config = PackerConfig {
        budget: config.token_budget,
        max_seqs: config.max_seqs_per_pack,
        window: config.window,
    };
    let skip = config.skip.clone();
    let names: Vec<String> = config
        .inputs
        .iter()
        .map(|p| crate::loader::display_path(p))
        .collect();
    let packer = spawn("virnuc-packer", move || {
        packer_loop(
            pack_config,
            streams,
            skip,
            names,
            done_rx,
            ticket_tx,
            pack_tx,
        )
    })?;
    Ok(Pipeline {
        rx: Some(pack_rx),
        reader: Some(reader),
        workers: handles,
        packer: Some(packer),
        config,
        progress,
        exhausted: false,
    })
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, DataError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| DataError::Config(format!("cannot start thread {name}: {e}")))
}

/// Part of a long nucleotide record: chunks `first..first + count` (1-based numbers) of a record of
/// `whole_len` bases; the batch holds only the bases those chunks cover, from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    whole_len: usize,
    first: usize,
    count: usize,
    offset: usize,
}

/// The reader's side of the work queue: fills batches and sends them, one ticket each.
struct BatchSender {
    tx: Sender<Work>,
    tickets: Receiver<()>,
    seq_no: u64,
    batch: RecordBatch,
    open: bool,
    /// Position in `batch` of the first record of the file being read.
    file_start: usize,
    /// The file being read (index into the inputs).
    file: u32,
}

impl BatchSender {
    fn send(&mut self, item: Result<RecordBatch, DataError>) {
        if self.open {
            self.open = self.tickets.recv().is_ok() && self.tx.send((self.seq_no, item)).is_ok();
            self.seq_no += 1;
        }
    }

    fn flush(&mut self) {
        if !self.batch.seq_ends.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.send(Ok(batch));
        }
        self.file_start = 0;
    }

    /// Drops the records of the file being read from the unsent batch (a file refused for its mode).
    fn drop_current_file(&mut self) {
        let b = &mut self.batch;
        let keep = self.file_start;
        b.ids
            .truncate(if keep == 0 { 0 } else { b.id_ends[keep - 1] });
        b.seqs
            .truncate(if keep == 0 { 0 } else { b.seq_ends[keep - 1] });
        b.id_ends.truncate(keep);
        b.seq_ends.truncate(keep);
        b.parts.truncate(keep);
        b.ordinals.truncate(keep);
        b.files.truncate(keep);
    }

    fn push(&mut self, ordinal: u64, id: &str, seq: &[u8], part: Option<Part>) {
        let b = &mut self.batch;
        b.ordinals.push(ordinal);
        b.files.push(self.file);
        b.ids.push_str(id);
        b.id_ends.push(b.ids.len());
        b.seqs.extend_from_slice(seq);
        b.seq_ends.push(b.seqs.len());
        b.parts.push(part);
        if b.seqs.len() >= BATCH_BYTES || b.seq_ends.len() >= BATCH_RECORDS {
            self.flush();
        }
    }

    /// Queues a record; a nucleotide record longer than a batch is cut into parts at chunk
    /// boundaries so that several workers share it.
    fn record(&mut self, ordinal: u64, id: &str, seq: &[u8], stage: &StageConfig) {
        if stage.mode != Mode::Nucleotide || seq.len() <= BATCH_BYTES {
            self.push(ordinal, id, seq, None);
            return;
        }
        let per_part = (BATCH_BYTES / stage.chunk_len).max(1);
        let all: Vec<_> = chunks(seq.len(), stage.chunk_len).collect();
        for group in all.chunks(per_part) {
            let (first, start) = (group[0].0, group[0].1.start);
            let end = group[group.len() - 1].1.end;
            let part = Part {
                whole_len: seq.len(),
                first,
                count: group.len(),
                offset: start,
            };
            self.push(ordinal, id, &seq[start..end], Some(part));
            if !self.open {
                return;
            }
        }
    }
}

/// Records the reader passed over because they belong to other shards.
#[derive(Debug, Default, Clone, Copy)]
struct OtherShards {
    records: u64,
    /// Of those, records with an empty sequence (the loader counts them as empty too).
    empty: u64,
}

fn reader_loop(
    mut source: Source,
    stage: StageConfig,
    shard: Option<crate::InputShard>,
    tx: Sender<Work>,
    tickets: Receiver<()>,
) -> (SourceStats, OtherShards) {
    let mut out = BatchSender {
        tx,
        tickets,
        seq_no: 0,
        batch: RecordBatch::default(),
        open: true,
        file_start: 0,
        file: 0,
    };
    // Position of each record handed over, across all inputs: the same in every shard's run. (A
    // FASTA file ending in a bare header is counted by the loader without being handed over: every
    // shard reports that record as empty.)
    let mut ordinal = 0u64;
    let mut others = OtherShards::default();
    let mut last_file = None;
    while out.open {
        match source.next_record(|r: RecordRef<'_>| {
            if last_file != Some(r.file) {
                last_file = Some(r.file);
                out.file = r.file as u32;
                out.file_start = out.batch.seq_ends.len();
            }
            let here = ordinal;
            ordinal += 1;
            if !shard.is_none_or(|s| s.takes(here)) {
                others.records += 1;
                others.empty += u64::from(r.seq.is_empty());
            } else if !r.seq.is_empty() {
                out.record(here, r.id, r.seq, &stage);
            }
        }) {
            Ok(true) => {}
            Ok(false) => {
                out.flush();
                break;
            }
            Err(e) => {
                // A file refused for its mode: none of its records still waiting in the batch
                // is embedded; the records of earlier files are.
                if matches!(e, DataError::Mode { .. }) && last_file == Some(source.current_file()) {
                    out.drop_current_file();
                }
                out.flush();
                out.send(Err(e));
                break;
            }
        }
    }
    (source.stats, others)
}

fn worker_loop(
    config: StageConfig,
    encoders: Vec<Arc<Encoder>>,
    rx: Receiver<Work>,
    tx: Sender<Done>,
) {
    let mut processor = RecordProcessor::new(config);
    for (seq_no, item) in rx {
        // A panic here would leave a hole in the sequence numbers and stall the packer: turn it
        // into an error for this batch instead (the processor's buffers are reset by `load`/`clear`).
        let out = item.and_then(|batch| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                process_batch(&mut processor, &encoders, &batch)
            }))
            .map_err(|_| DataError::Panic("worker"))?
        });
        if tx.send((seq_no, out)).is_err() {
            return;
        }
    }
}

fn process_batch(
    processor: &mut RecordProcessor,
    encoders: &[Arc<Encoder>],
    batch: &RecordBatch,
) -> Result<TokenBatch, DataError> {
    let mut out = TokenBatch {
        tokens: vec![Vec::new(); encoders.len()],
        token_ends: vec![Vec::new(); encoders.len()],
        ..TokenBatch::default()
    };
    let mut id_start = 0;
    let mut seq_start = 0;
    let mut failed = None;
    for ((((&id_end, &seq_end), &part), &ordinal), &file) in batch
        .id_ends
        .iter()
        .zip(&batch.seq_ends)
        .zip(&batch.parts)
        .zip(&batch.ordinals)
        .zip(&batch.files)
    {
        let id = &batch.ids[id_start..id_end];
        let seq = &batch.seqs[seq_start..seq_end];
        let mut unknown = 0;
        let TokenBatch {
            ids,
            id_ends,
            tokens,
            token_ends,
            records,
            files,
            stats,
        } = &mut out;
        processor.process(id, seq, part, stats, &mut |name, protein, dna| {
            ids.push_str(name);
            id_ends.push(ids.len());
            records.push(ordinal);
            files.push(file);
            for (k, encoder) in encoders.iter().enumerate() {
                let input = match encoder.traits().frame_input {
                    FrameInput::Protein => protein,
                    FrameInput::DnaSpan => dna,
                };
                match encoder.encode(input, &mut tokens[k]) {
                    Ok(u) => unknown += u,
                    Err(message) => {
                        failed.get_or_insert(DataError::Encode {
                            id: name.to_string(),
                            message,
                        });
                    }
                }
                token_ends[k].push(tokens[k].len());
            }
        });
        out.stats.unknown_residues += unknown as u64;
        if let Some(e) = failed {
            return Err(e);
        }
        id_start = id_end;
        seq_start = seq_end;
    }
    Ok(out)
}

fn packer_loop(
    config: PackerConfig,
    streams: usize,
    skip: Option<crate::SkipFn>,
    names: Vec<String>,
    rx: Receiver<Done>,
    tickets: Sender<()>,
    tx: Sender<Result<TaggedPack, DataError>>,
) -> PackerOutcome {
    let mut outcome = PackerOutcome::default();
    let mut packers: Vec<Packer> = (0..streams).map(|_| Packer::new(config)).collect();
    let mut pending: BTreeMap<u64, Result<TokenBatch, DataError>> = BTreeMap::new();
    let mut next_batch = 0u64;
    let mut next_index = 0u64;
    let mut ready: Vec<TaggedPack> = Vec::new();
    let mut made: Vec<PackedBatch> = Vec::new();
    let mut packs_skipped = 0u64;
    // Packs whose sequences an interrupted run wrote already are made (packing stays the same as
    // in an uninterrupted run) but not delivered.
    let mut send_ready = |ready: &mut Vec<TaggedPack>| -> bool {
        ready.drain(..).all(|p| {
            let all_done = skip
                .as_ref()
                .is_some_and(|s| p.1.sequences.iter().all(|m| s.is_done(m.index)));
            if all_done {
                packs_skipped += 1;
                return true;
            }
            tx.send(Ok(p)).is_ok()
        })
    };
    let changed = |m: crate::ResumeMismatch| DataError::InputChanged {
        file: m
            .file
            .and_then(|f| names.get(f as usize).cloned())
            .unwrap_or_else(|| "the input".into()),
        message: m.message,
    };
    let mut failure: Option<DataError> = None;
    let finish_all = |packers: &mut Vec<Packer>, ready: &mut Vec<TaggedPack>| {
        for (k, packer) in packers.iter_mut().enumerate() {
            let mut made = Vec::new();
            packer.finish(&mut made);
            ready.extend(made.into_iter().map(|p| (k, p)));
        }
    };
    'outer: while let Ok((seq_no, item)) = rx.recv() {
        pending.insert(seq_no, item);
        while let Some(item) = pending.remove(&next_batch) {
            next_batch += 1;
            // The batch left the in-flight set: the reader may read another one.
            let _ = tickets.send(());
            match item {
                Ok(batch) => {
                    outcome.stages.add(&batch.stats);
                    let mut id_start = 0;
                    let mut tok_start = vec![0; streams];
                    for (i, (&id_end, &record)) in
                        batch.id_ends.iter().zip(&batch.records).enumerate()
                    {
                        let index = next_index;
                        next_index += 1;
                        let id = &batch.ids[id_start..id_end];
                        id_start = id_end;
                        if let Some(check) = &skip {
                            // The first encoder's tokens are what the output's row was made from.
                            let end = batch.token_ends[0][i];
                            let tokens = &batch.tokens[0][tok_start[0]..end];
                            let digest = virnuc_core::sequence_digest(id, tokens.iter().copied());
                            let file = batch.files.get(i).copied().unwrap_or(u32::MAX);
                            match check.check(index, id, digest, file) {
                                Ok(true) => outcome.skipped_resume += 1,
                                Ok(false) => {}
                                Err(m) => {
                                    failure = Some(changed(m));
                                    break 'outer;
                                }
                            }
                        }
                        for (k, packer) in packers.iter_mut().enumerate() {
                            let tok_end = batch.token_ends[k][i];
                            let tokens = &batch.tokens[k][tok_start[k]..tok_end];
                            tok_start[k] = tok_end;
                            let meta = SequenceMeta {
                                index,
                                record,
                                id: id.to_string(),
                                residues: (tokens.len() - 2) as u32,
                            };
                            packer.push(
                                PackItem {
                                    meta,
                                    tokens: tokens.to_vec(),
                                },
                                &mut made,
                            );
                            ready.extend(made.drain(..).map(|p| (k, p)));
                        }
                        if !send_ready(&mut ready) {
                            break 'outer;
                        }
                    }
                }
                Err(e) => {
                    // Deliver what came before the bad record, then the error.
                    finish_all(&mut packers, &mut ready);
                    let sent = send_ready(&mut ready);
                    outcome.packing = packers.iter().map(|p| p.stats().clone()).collect();
                    outcome.packs_skipped_resume = packs_skipped;
                    outcome.error = Some(e.to_string());
                    if sent {
                        let _ = tx.send(Err(e));
                    }
                    return outcome;
                }
            }
        }
    }
    if failure.is_none()
        && pending.is_empty()
        && rx.is_empty()
        && let Some(check) = &skip
        && let Err(m) = check.finish()
    {
        failure = Some(changed(m));
    }
    if let Some(e) = failure {
        // Nothing more is delivered: the consumer must not write packs of a changed input.
        outcome.packing = packers.iter().map(|p| p.stats().clone()).collect();
        outcome.packs_skipped_resume = packs_skipped;
        outcome.error = Some(e.to_string());
        let _ = tx.send(Err(e));
        return outcome;
    }
    if pending.is_empty() && rx.is_empty() {
        finish_all(&mut packers, &mut ready);
        outcome.finished = send_ready(&mut ready);
    }
    outcome.packing = packers.iter().map(|p| p.stats().clone()).collect();
    outcome.packs_skipped_resume = packs_skipped;
    outcome
}

/// The packs of a run with one encoder. With several (`predict`), use [`Pipeline::next_tagged`]:
/// this iterator would mix the encoders' packs.
impl Iterator for Pipeline {
    type Item = Result<PackedBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_tagged().map(|r| r.map(|(_, p)| p))
    }
}

impl Pipeline {
    /// The next pack and the index (in [`PipelineConfig::encoders`]) of the encoder it is for.
    /// Each output index appears once in every encoder's packs; packs of different encoders come
    /// interleaved, each encoder's in its own deterministic order.
    pub fn next_tagged(&mut self) -> Option<Result<TaggedPack, DataError>> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(item) => Some(item),
            Err(_) => {
                self.exhausted = true;
                None
            }
        }
    }

    /// Bytes read from the inputs so far and their total size (for a progress bar).
    pub fn input_progress(&self) -> InputProgress {
        self.progress.clone()
    }

    /// [`Iterator::next`] that gives up after `timeout` (`Err(Timeout)`), so that the caller can
    /// look at other things (a signal) while the input is slow (a pipe).
    pub fn next_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<Result<PackedBatch, DataError>>, crossbeam_channel::RecvTimeoutError> {
        let Some(rx) = self.rx.as_ref() else {
            return Ok(None);
        };
        match rx.recv_timeout(timeout) {
            Ok(item) => Ok(Some(item.map(|(_, p)| p))),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                self.exhausted = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Stops the threads (early if the packs were not all taken) and returns the run report.
    /// Errors: [`DataError::RunFailed`] (with the report so far) if the run hit an input error,
    /// [`DataError::Panic`] if a thread panicked. A consumer that stops early gets `Ok` with
    /// `complete: false`.
    pub fn finish(mut self) -> Result<RunReport, DataError> {
        drop(self.rx.take());
        let packer = self
            .packer
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| DataError::Panic("packer"))?
            .unwrap_or_default();
        for w in self.workers.drain(..) {
            w.join().map_err(|_| DataError::Panic("worker"))?;
        }
        let (source, others) = self
            .reader
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| DataError::Panic("reader"))?
            .unwrap_or_default();
        let c = &self.config;
        let mut by_model = packer.packing.into_iter();
        let packing = by_model.next().unwrap_or_default();
        let packing_other_models: Vec<PackStats> = by_model.collect();
        let capacity = packing.tokens + packing.unused_budget;
        let report = RunReport {
            mode: c.mode.as_str().to_string(),
            chunk_len: c.chunk_len,
            virnucpro_compat: c.virnucpro_compat,
            max_residues: c.max_residues,
            long_policy: c.long,
            token_budget: c.token_budget,
            files: source.files,
            records_read: source.records_read,
            records_empty: source.records_empty - others.empty,
            input_shard: c.input_shard,
            records_other_shards: others.records,
            duplicate_ids: source.duplicate_ids,
            duplicate_check_capped: source.duplicate_check_capped,
            non_utf8_ids: source.non_utf8_ids,
            empty_ids: source.empty_ids,
            whitespace_removed: source.whitespace_removed,
            stages: packer.stages,
            skipped_resume: packer.skipped_resume,
            packs_skipped_resume: packer.packs_skipped_resume,
            utilization: if capacity == 0 {
                0.0
            } else {
                packing.tokens as f64 / capacity as f64
            },
            packing,
            packing_other_models,
            errors: packer.error.iter().cloned().collect(),
            complete: packer.finished && self.exhausted && packer.error.is_none(),
        };
        match packer.error {
            Some(first) => Err(DataError::RunFailed {
                first,
                report: Box::new(report),
            }),
            None => Ok(report),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Close the queue so every stage stops; threads are detached if finish() was not called.
        drop(self.rx.take());
    }
}

/// A protein exactly as it goes to the model: output index, name and residues (after chunking,
/// translation and the long-sequence policy), for `virnuc-trt translate`; in nucleotide mode also
/// the DNA span of its frame (what a DNA model gets; empty in protein mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProteinRecord {
    pub index: u64,
    pub id: String,
    pub residues: String,
    pub dna: String,
}

/// Sequential, single-threaded view of the same stages as [`start`]; same indices and names.
#[derive(Debug)]
pub struct Proteins {
    source: Source,
    processor: RecordProcessor,
    queue: std::collections::VecDeque<ProteinRecord>,
    next_index: u64,
    /// Stage counters so far.
    pub stats: StageStats,
    failed: bool,
    /// The error that ended the input, handed out after the proteins before it.
    error: Option<DataError>,
    /// Input of the last record read, and how many queued proteins came from it.
    file: Option<usize>,
    file_items: usize,
}

/// The proteins of `config.inputs` (the packing fields of `config` are ignored).
pub fn proteins(config: &PipelineConfig) -> Result<Proteins, DataError> {
    config.validate()?;
    proteins_from(
        config.inputs.iter().cloned().map(Input::Path).collect(),
        config,
    )
}

/// [`proteins`] over explicit inputs (readers included); `config.inputs` is ignored.
pub fn proteins_from(inputs: Vec<Input>, config: &PipelineConfig) -> Result<Proteins, DataError> {
    if config.input_shard.is_some() {
        // Not implemented for this view: refusing beats returning every record as if sharded.
        return Err(DataError::Config(
            "input shards are taken by the threaded pipeline only".into(),
        ));
    }
    if config.chunk_len < 3 || config.max_residues == 0 {
        return Err(DataError::Config(
            "chunk_len must be at least 3 and max_residues positive".into(),
        ));
    }
    let stage = StageConfig {
        need_dna: config.mode == Mode::Nucleotide,
        ..StageConfig::from(config)
    };
    let mut source = Source::from_inputs(inputs);
    if !config.force_mode {
        source = source.check_mode(config.mode);
    }
    Ok(Proteins {
        source,
        processor: RecordProcessor::new(stage),
        queue: Default::default(),
        next_index: 0,
        stats: StageStats::default(),
        failed: false,
        error: None,
        file: None,
        file_items: 0,
    })
}

impl Proteins {
    /// Reader counters so far (records, files, duplicates).
    pub fn source_stats(&self) -> &SourceStats {
        &self.source.stats
    }

    /// The reader and stage counters so far as a run report (no packing: `translate` packs nothing).
    pub fn report(&self, config: &PipelineConfig) -> RunReport {
        let source = &self.source.stats;
        RunReport {
            mode: config.mode.as_str().to_string(),
            chunk_len: config.chunk_len,
            virnucpro_compat: config.virnucpro_compat,
            max_residues: config.max_residues,
            long_policy: config.long,
            files: source.files.clone(),
            records_read: source.records_read,
            records_empty: source.records_empty,
            duplicate_ids: source.duplicate_ids,
            duplicate_check_capped: source.duplicate_check_capped,
            non_utf8_ids: source.non_utf8_ids,
            empty_ids: source.empty_ids,
            whitespace_removed: source.whitespace_removed,
            stages: self.stats.clone(),
            ..RunReport::default()
        }
    }
}

impl Iterator for Proteins {
    type Item = Result<ProteinRecord, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        // While the mode check of the file being read is undecided its proteins are held back, so
        // that a file refused for its mode yields none of them.
        while (self.queue.is_empty() || self.source.mode_pending()) && !self.failed {
            let Self {
                source,
                processor,
                queue,
                next_index,
                stats,
                file,
                file_items,
                ..
            } = self;
            let r = source.next_record(|r| {
                if *file != Some(r.file) {
                    *file = Some(r.file);
                    *file_items = 0;
                }
                if r.seq.is_empty() {
                    return;
                }
                processor.process(r.id, r.seq, None, stats, &mut |name, residues, dna| {
                    queue.push_back(ProteinRecord {
                        index: *next_index,
                        id: name.to_string(),
                        residues: String::from_utf8_lossy(residues).into_owned(),
                        dna: String::from_utf8_lossy(dna).into_owned(),
                    });
                    *next_index += 1;
                    *file_items += 1;
                });
            });
            match r {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    if matches!(e, DataError::Mode { .. })
                        && self.file == Some(self.source.current_file())
                    {
                        let keep = self.queue.len().saturating_sub(self.file_items);
                        self.queue.truncate(keep);
                    }
                    self.failed = true;
                    self.error = Some(e);
                }
            }
        }
        match self.queue.pop_front() {
            Some(p) => Some(Ok(p)),
            None => self.error.take().map(Err),
        }
    }
}
