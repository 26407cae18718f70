//! `virnuc-trt embed`: FASTA in, HDF5 embeddings out.
//!
//! Threads: the data pipeline (reader, workers, packer) feeds this thread, which hands packs to
//! the engine thread (bounded queue); a writer thread takes results and stores them. So while
//! the engine computes pack N, pack N+1 is being prepared and pack N−1 written.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use virnuc_build::engine_build::check_engine_dir;
use virnuc_data::RunReport;
use virnuc_engine::{EngineInfo, EngineOptions, EngineThreadStats, Ep};
use virnuc_output::{EmbeddingWriter, FinishSummary, OutputConfig, OutputError};

use crate::devices::{DeviceReport, Engines, ModelRun};
use crate::exit;
use crate::settings::{CPU_TOKS_PER_BATCH, EmbedArgs, EmbedSettings, usage};

/// The JSON run report.
#[derive(Debug, Serialize)]
pub struct EmbedReport {
    pub virnuc_trt_version: &'static str,
    pub output: PathBuf,
    pub output_precision: &'static str,
    pub model: PathBuf,
    pub model_name: String,
    pub attention: String,
    pub model_precision: String,
    pub random_weights: bool,
    pub ep: &'static str,
    pub ep_note: Option<String>,
    pub onnx_runtime: String,
    pub onnx_runtime_library: PathBuf,
    /// Input records read.
    pub records: u64,
    /// Sequences in the output (all runs, when resumed).
    pub sequences: u64,
    /// Sequences embedded by this run (the rest were done by an interrupted run).
    pub sequences_this_run: u64,
    /// Sequences an interrupted run had written (`sequences_this_run` + this = `sequences`).
    pub sequences_skipped_resume: u64,
    /// Packs run by the engine in this run: `data.packing.packs − data.packs_skipped_resume`
    /// (`data.packing` describes every pack of the input, resumed or not).
    pub packs: u64,
    /// Tokens embedded by this run, `<cls>`/`<eos>` included.
    pub tokens: u64,
    pub residues: u64,
    /// Σ (budget − pack tokens): what a fixed-shape engine would pad; none is computed here.
    pub padding_tokens: u64,
    pub padding_fraction: f64,
    pub token_budget: usize,
    /// Whole command, model load included.
    pub wall_s: f64,
    pub engine_open_s: f64,
    pub warmup_s: f64,
    /// First pack in to last pack out.
    pub embed_wall_s: f64,
    /// Tokens / embed_wall_s.
    pub tokens_per_s: f64,
    pub sequences_per_s: f64,
    /// Σ run time / embed wall time: the engine's (GPU's) busy share; idle = 1 − busy.
    pub engine_busy_fraction: f64,
    pub engine_idle_fraction: f64,
    /// Time the engine waited for the next pack (the loader not keeping up).
    pub engine_starved_s: f64,
    pub output_bytes: u64,
    pub shards: usize,
    pub resumed: bool,
    /// `--devices`: what each device did (packs, busy share, restarts, whether it failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceReport>>,
    /// The data path's own report (every record accounted for).
    pub data: RunReport,
}

struct WriterDone {
    writer: EmbeddingWriter,
    sequences: u64,
}

/// What a run that failed had done, for its report.
#[derive(Debug, Default)]
struct Progress {
    resumed: bool,
    /// Sequences this run handed to the writer.
    sequences_this_run: u64,
    /// Sequences durable in the working folder (a `--resume` continues from them).
    sequences_kept: u64,
    /// The working folder, when it is kept for a `--resume`.
    work_kept: Option<PathBuf>,
    data: Option<RunReport>,
}

/// The JSON report of a run that failed: what went wrong and what was done.
#[derive(Debug, Serialize)]
pub struct FailureReport {
    pub virnuc_trt_version: &'static str,
    pub output: PathBuf,
    pub complete: bool,
    pub error: String,
    pub exit_status: u8,
    pub resumed: bool,
    pub sequences_this_run: u64,
    /// Sequences kept in `work_folder` for `--resume` (0 when it was removed).
    pub sequences_kept: u64,
    pub work_folder: Option<PathBuf>,
    /// The data path's report as far as it got (records read, per file), when it started.
    pub data: Option<RunReport>,
}

/// SIGINT/SIGTERM: the first stops the run cleanly (work made durable, report written, exit
/// 130/143); a second one ends the process at once.
struct Signals {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        for (sig, flag, code) in [
            (SIGINT, &int, i32::from(exit::SIGINT)),
            (SIGTERM, &term, i32::from(exit::SIGTERM)),
        ] {
            signal_hook::flag::register_conditional_shutdown(sig, code, Arc::clone(flag))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(flag)))
                .context("cannot install the signal handlers")?;
        }
        Ok(Self { int, term })
    }

    fn raised(&self) -> Option<exit::Interrupted> {
        if self.term.load(Ordering::Relaxed) {
            Some(exit::Interrupted(signal_hook::consts::SIGTERM))
        } else if self.int.load(Ordering::Relaxed) {
            Some(exit::Interrupted(signal_hook::consts::SIGINT))
        } else {
            None
        }
    }
}

/// The writer's resume check seen by the data path.
struct ResumeAdapter(Arc<virnuc_output::InputCheck>);

impl virnuc_data::ResumeCheck for ResumeAdapter {
    fn is_done(&self, index: u64) -> bool {
        self.0.is_done(index)
    }
    fn check(
        &self,
        index: u64,
        id: &str,
        digest: u64,
        file: u32,
    ) -> std::result::Result<bool, virnuc_data::ResumeMismatch> {
        self.0.check(index, id, digest, file).map_err(mismatch)
    }
    fn finish(&self) -> std::result::Result<(), virnuc_data::ResumeMismatch> {
        self.0.finish().map_err(mismatch)
    }
}

fn mismatch(e: OutputError) -> virnuc_data::ResumeMismatch {
    let file = match &e {
        OutputError::InputChanged { tag, .. } => *tag,
        _ => None,
    };
    virnuc_data::ResumeMismatch {
        file,
        message: e.to_string(),
    }
}

pub fn run(args: &EmbedArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut s = EmbedSettings::resolve(args)?;
    // The report's path first: a run must not end after hours with nowhere to report.
    precheck_report(&s)?;
    let mut progress = Progress::default();
    let result = Signals::install().and_then(|signals| {
        if s.worker.is_none() {
            precheck_output(&s)?;
        }
        run_checked(&mut s, &signals, &mut progress, t0)
    });
    if let Err(e) = &result {
        let report = FailureReport {
            virnuc_trt_version: env!("CARGO_PKG_VERSION"),
            output: s.out.clone(),
            complete: false,
            error: format!("{e:#}"),
            exit_status: exit::code_of(e),
            resumed: progress.resumed,
            sequences_this_run: progress.sequences_this_run,
            sequences_kept: progress.sequences_kept,
            work_folder: progress.work_kept.clone(),
            data: progress.data.take(),
        };
        if let Err(w) = emit_report(&s, &report) {
            eprintln!("virnuc-trt: warning: {w:#}");
        }
        if let Some(work) = &progress.work_kept {
            eprintln!(
                "virnuc-trt: {} sequences are kept in {}: run the same command with --resume to \
                 continue, or delete it to start over",
                progress.sequences_kept,
                work.display()
            );
        }
    }
    result
}

fn run_checked(
    s: &mut EmbedSettings,
    signals: &Signals,
    progress: &mut Progress,
    t0: Instant,
) -> Result<()> {
    let mut options = match &s.engine {
        Some(dir) => {
            let checked = check_engine_dir(dir, s.ort_lib.as_deref(), s.device_set, s.force)
                .with_context(|| format!("engine {}", dir.display()))?;
            if let Some(m) = &checked.forced_mismatch {
                eprintln!("virnuc-trt: warning: --force: {m}");
            }
            if s.ep != Ep::Auto && s.ep != checked.options.ep {
                return usage(format!(
                    "--ep {} but engine {} was built for {}",
                    s.ep.name(),
                    dir.display(),
                    checked.manifest.ep
                ));
            }
            s.ep = checked.options.ep;
            s.device = checked.options.device_id;
            if !s.toks_per_batch_set {
                // The budget `build` tuned for this engine and device.
                s.toks_per_batch = checked.budget;
            }
            checked.options
        }
        None => {
            let mut o = EngineOptions::new(&s.model, s.ep);
            o.ort_lib = s.ort_lib.clone();
            o.device_id = s.device;
            o.trt_cache_dir = s.trt_cache.clone();
            o
        }
    };
    options.intra_threads = s.threads;
    options.per_token = s.per_token;
    options.skip_hash = s.skip_hash;
    options.kernel_dir = s.kernel_dir.clone();
    if s.engine.is_some() {
        // An engine's TensorRT cache is its own folder, unless --trt-cache says otherwise.
        if let Some(c) = &s.trt_cache {
            options.trt_cache_dir = Some(c.clone());
        }
    }
    // Warm up at the largest pack on GPUs (allocations, kernel choices); the CPU needs none.
    let warmup = (s.ep != Ep::Cpu).then_some(s.toks_per_batch);
    let models = vec![ModelRun {
        name: s.model.display().to_string(),
        options,
        warmup,
    }];
    if let Some(slot) = s.worker {
        return crate::devices::serve(slot, models, s.prefetch);
    }
    let (engine, mut results) = Engines::start(models, s.devices.as_ref(), s.prefetch)?;
    let results = results.remove(0);
    let info = engine.info(0).clone();
    if info.ep == "cpu" && !s.toks_per_batch_set && s.engine.is_none() {
        // `auto` ended on the CPU: use the CPU's budget (attention memory grows with the pack).
        s.toks_per_batch = CPU_TOKS_PER_BATCH;
    }
    if let Some(note) = &info.ep_note {
        eprintln!("virnuc-trt: {note}");
    }
    crate::settings::warn_all(&s.ineffective(info.ep));
    let encoder = model_encoder(&info)?;
    let family = encoder.family();
    if s.mode == virnuc_data::Mode::Protein && !family.traits().reads_proteins {
        return usage(format!(
            "--mode protein: {} is a {family} model, which embeds DNA (each kept frame's DNA span \
             in nucleotide mode); give DNA inputs with --mode nucleotide, or an ESM-2 model",
            s.model.display()
        ));
    }
    if s.long == virnuc_data::LongPolicy::Split
        && family.traits().frame_input == virnuc_core::FrameInput::DnaSpan
    {
        return usage(format!(
            "--long split cuts proteins into windows; a {family} model takes each frame's DNA whole \
             (use --long truncate or skip)"
        ));
    }
    if info.metadata.random_weights {
        eprintln!(
            "virnuc-trt: note: {} has RANDOM weights (a test/demo export): the embeddings mean nothing",
            s.model.display()
        );
    }

    let output = OutputConfig {
        path: s.out.clone(),
        hidden_size: info.hidden_size,
        per_token: s.per_token,
        dtype: s.precision.dtype(),
        attributes: attributes(s, &info)?,
        resume: s.resume,
        shard_sequences: s.shard_sequences,
    };
    let writer = match EmbeddingWriter::open(output) {
        Ok(w) => w,
        Err(OutputError::AlreadyComplete { path }) => {
            eprintln!(
                "virnuc-trt: {} is already complete; nothing to resume",
                path.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("cannot open the output"),
    };
    let resumed = writer.resume_info().sequences_done > 0;
    progress.resumed = resumed;
    progress.sequences_kept = writer.sequences_durable();
    progress.work_kept = Some(writer.work_dir().to_path_buf());
    if resumed {
        let r = writer.resume_info();
        eprintln!(
            "virnuc-trt: resuming: {} sequences already done ({} shards kept, {} discarded)",
            r.sequences_done,
            r.shards_kept,
            r.discarded.len()
        );
    }
    // Resume skips whole packs, not sequences: packing is deterministic, so every sequence is
    // computed in the same pack as in an uninterrupted run and the final file is bit-identical
    // (matrix products over a different pack round differently in the last bit). The data path
    // checks each done sequence against the digest the interrupted run stored and drops packs
    // that are all done; a pack that is partly done is recomputed and only its missing sequences
    // are written.
    let done = writer.done();
    let mut config = s.pipeline();
    config.encoders = vec![encoder];
    if resumed {
        config.skip = Some(Arc::new(ResumeAdapter(writer.input_check())));
    }
    let mut pipeline = match virnuc_data::start(config) {
        Ok(p) => p,
        Err(e) => {
            progress.sequences_kept = writer.stop();
            return Err(anyhow!(e).context("cannot start reading"));
        }
    };

    let input = pipeline.input_progress();
    let progress_bar = progress_bar(s.quiet, input.total_bytes());
    let writer_progress = progress_bar.clone();
    let writer_done = done.clone();
    // The writer comes back with the outcome, so that a failed run can still make its work
    // durable (or remove an empty working folder).
    let writer_thread = std::thread::Builder::new()
        .name("virnuc-writer".into())
        .spawn(move || -> (WriterDone, Result<()>) {
            let mut done = WriterDone {
                writer,
                sequences: 0,
            };
            let mut tokens = 0u64;
            let start = Instant::now();
            let outcome = (|| -> Result<()> {
                for r in results.iter() {
                    let r = r.map_err(|e| anyhow!(e))?;
                    let context = || {
                        format!(
                            "cannot write the pack starting with {}",
                            r.batch.sequences[0].id
                        )
                    };
                    let keep: Vec<usize> = (0..r.batch.num_sequences())
                        .filter(|&i| !writer_done(r.batch.sequences[i].index))
                        .collect();
                    let digests: Vec<u64> = keep
                        .iter()
                        .map(|&i| {
                            let ids = &r.batch.input_ids[r.batch.token_range(i)];
                            virnuc_core::sequence_digest(
                                &r.batch.sequences[i].id,
                                ids.iter().map(|&t| t as u32),
                            )
                        })
                        .collect();
                    if keep.len() == r.batch.num_sequences() {
                        let states = r
                            .embeddings
                            .hidden
                            .as_deref()
                            .map(|h| (h, r.batch.cu_seqlens.as_slice()));
                        done.writer
                            .write_pack_with_digests(
                                &r.batch.sequences,
                                &digests,
                                &r.embeddings.mean,
                                states,
                            )
                            .with_context(context)?;
                    } else {
                        let sel = select(&r.batch, &r.embeddings, &keep);
                        let states = sel
                            .states
                            .as_ref()
                            .map(|(h, cu)| (h.as_slice(), cu.as_slice()));
                        done.writer
                            .write_pack_with_digests(&sel.sequences, &digests, &sel.mean, states)
                            .with_context(context)?;
                    }
                    done.sequences += keep.len() as u64;
                    tokens += r.batch.num_tokens() as u64;
                    let secs = start.elapsed().as_secs_f64().max(1e-9);
                    writer_progress.set_position(input.bytes_read());
                    writer_progress.set_message(format!(
                        "{} sequences, {:.0} tokens/s",
                        done.sequences,
                        tokens as f64 / secs
                    ));
                }
                Ok(())
            })();
            (done, outcome)
        })
        .context("cannot start the writer thread")?;

    // Feed the engine. A failure downstream closes its queue: stop feeding and report that error.
    let mut feed_error = None;
    let mut input_changed = false;
    loop {
        if let Some(sig) = signals.raised() {
            feed_error = Some(anyhow!(sig));
            break;
        }
        let pack = match pipeline.next_timeout(Duration::from_millis(200)) {
            Ok(Some(pack)) => pack,
            Ok(None) => break,
            // Nothing yet (a slow pipe): look at the signals again.
            Err(_) => continue,
        };
        match pack {
            Ok(p) => {
                if p.sequences.iter().all(|m| done(m.index)) {
                    continue;
                }
                if engine.submit(0, p).is_err() {
                    break;
                }
            }
            Err(e) => {
                input_changed = matches!(e, virnuc_data::DataError::InputChanged { .. });
                feed_error = Some(anyhow!(e).context("reading the input failed"));
                break;
            }
        }
    }
    if feed_error.is_none()
        && let Some(sig) = signals.raised()
    {
        feed_error = Some(anyhow!(sig));
    }
    let engine_stats = engine.finish();
    let (engine_stats, device_reports) = match engine_stats {
        Ok(mut done) => (Ok(done.models.remove(0)), done.devices),
        Err(e) => (Err(e), None),
    };
    let (written, write_result) = writer_thread
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))?;
    progress_bar.finish_and_clear();
    progress.sequences_this_run = written.sequences;
    let interrupted = feed_error
        .as_ref()
        .is_some_and(|e| e.is::<exit::Interrupted>());
    let data = if interrupted {
        // The reader may be blocked on a pipe that never ends: leave the threads, the process
        // ends soon.
        drop(pipeline);
        Err(virnuc_data::DataError::Config("interrupted".into()))
    } else {
        pipeline.finish()
    };
    progress.data = match &data {
        Ok(r) => Some(r.clone()),
        Err(virnuc_data::DataError::RunFailed { report, .. }) => Some((**report).clone()),
        Err(_) => None,
    };
    // The first failure in flow order is the cause; later ones are its consequences.
    let failure = match (write_result, engine_stats, feed_error) {
        (_, _, Some(e)) => Err(e),
        (Err(e), _, _) => Err(e),
        (_, Err(e), _) => Err(e),
        (Ok(()), Ok(stats), None) => Ok(stats),
    };
    let failure = failure.and_then(|stats| match data {
        Ok(d) => Ok((stats, d)),
        Err(e) => Err(anyhow!(e).context("reading the input failed")),
    });
    let (stats, data) = match failure {
        Ok(x) => x,
        Err(e) if input_changed => {
            // Nothing of this run is kept: the working folder is as the interrupted run left it.
            progress.sequences_this_run = 0;
            if let Err(a) = written.writer.abandon() {
                eprintln!("virnuc-trt: warning: cannot undo this run's shards: {a}");
            }
            return Err(e);
        }
        Err(e) => {
            progress.sequences_kept = written.writer.stop();
            if progress.sequences_kept == 0 {
                progress.work_kept = None;
            }
            return Err(e);
        }
    };
    finish(
        s,
        &info,
        written,
        (stats, device_reports),
        data,
        t0,
        progress,
    )
}

/// The tokenizer of the engine's model family: the ESM-2 alphabet, or the export's `tokenizer.json`
/// (its sha256 was checked against `model.json` when the engine opened).
pub fn model_encoder(info: &EngineInfo) -> Result<std::sync::Arc<virnuc_data::Encoder>> {
    let files = virnuc_engine::ModelFiles::locate(&info.model_path)
        .with_context(|| format!("model {}", info.model_path.display()))?;
    let tokenizer = files.tokenizer_file(&info.metadata);
    let encoder = virnuc_data::Encoder::for_model(&info.metadata, tokenizer.as_deref())
        .with_context(|| format!("the tokenizer of {}", info.model_path.display()))?;
    Ok(std::sync::Arc::new(encoder))
}

/// Some sequences of a pack, with their rows of `mean` and (re-based) token states.
#[derive(Debug, PartialEq)]
struct Selection {
    sequences: Vec<virnuc_core::SequenceMeta>,
    mean: Vec<f32>,
    states: Option<(Vec<f32>, Vec<i32>)>,
}

fn select(
    batch: &virnuc_core::PackedBatch,
    emb: &virnuc_engine::Embeddings,
    keep: &[usize],
) -> Selection {
    let h = emb.hidden_size;
    let sequences = keep.iter().map(|&i| batch.sequences[i].clone()).collect();
    let mean = keep
        .iter()
        .flat_map(|&i| emb.mean[i * h..(i + 1) * h].iter().copied())
        .collect();
    let states = emb.hidden.as_ref().map(|hidden| {
        let mut cu = vec![0i32];
        let mut rows = Vec::new();
        for &i in keep {
            let r = batch.token_range(i);
            rows.extend_from_slice(&hidden[r.start * h..r.end * h]);
            cu.push(cu[cu.len() - 1] + r.len() as i32);
        }
        (rows, cu)
    });
    Selection {
        sequences,
        mean,
        states,
    }
}

/// Refuses an output that exists (without --resume) or cannot be written, before the model loads.
fn precheck_output(s: &EmbedSettings) -> Result<()> {
    if s.out.is_dir() {
        return Err(output_failure(format!(
            "output {} is a folder; give a .h5 file path",
            s.out.display()
        )));
    }
    if s.out.exists() && !s.resume {
        return Err(output_failure(format!(
            "{} already exists; refusing to overwrite it (remove it or choose another output; \
             --resume only continues an interrupted run)",
            s.out.display()
        )));
    }
    let parent = match s.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(output_failure(format!(
            "cannot write output {}: folder {} does not exist",
            s.out.display(),
            parent.display()
        )));
    }
    // A probe file tells writability for real (permissions, read-only mounts, ACLs).
    let probe = parent.join(format!(".virnuc-trt-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(output_failure(format!(
            "cannot write output {}: {e}",
            s.out.display()
        ))),
    }
}

fn output_failure(message: String) -> anyhow::Error {
    exit::OutputFailure(message).into()
}

/// HDF5 attributes: model metadata and run settings. No times or host names, so equal runs give
/// equal files (and a resumed run can check that it continues the same run).
fn attributes(s: &EmbedSettings, info: &EngineInfo) -> Result<Vec<(String, String)>> {
    let meta = &info.metadata;
    Ok(vec![
        (
            "virnuc_trt_version".into(),
            env!("CARGO_PKG_VERSION").into(),
        ),
        ("model_name".into(), meta.model.name.clone()),
        ("model_family".into(), meta.family.as_str().into()),
        ("model_attention".into(), meta.attention.clone()),
        ("model_precision".into(), meta.precision.clone()),
        ("model_onnx_sha256".into(), meta.onnx_sha256.clone()),
        ("random_weights".into(), meta.random_weights.to_string()),
        (
            "model_metadata".into(),
            serde_json::to_string(meta).context("model metadata")?,
        ),
        ("precision".into(), s.precision.as_str().into()),
        ("ep".into(), info.ep.into()),
        ("onnx_runtime_version".into(), info.ort_version.clone()),
        ("mode".into(), s.mode.as_str().into()),
        ("chunk_len".into(), s.chunk.to_string()),
        ("max_residues".into(), s.max_residues.to_string()),
        (
            "long_policy".into(),
            serde_json::to_value(s.long)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        ("virnucpro_compat".into(), s.virnucpro_compat.to_string()),
        // Packing decides rounding in the last bit: a resume must use the same budget to give a
        // bit-identical file (the writer refuses a resume whose attributes differ).
        ("token_budget".into(), s.toks_per_batch.to_string()),
        // Which part of the input this file holds ("all" or I/N); a resume with another part is
        // refused with the other attributes.
        (
            "input_shard".into(),
            s.input_shard
                .map_or_else(|| "all".to_string(), |shard| shard.to_string()),
        ),
    ])
}

/// Progress in input bytes as they are on disk (compressed bytes for compressed files, counted by
/// the file reader): of the total with percent and ETA when every input is a file, a rate on
/// standard input.
fn progress_bar(quiet: bool, total_bytes: Option<u64>) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(total_bytes, ProgressDrawTarget::stderr());
    pb.set_style(
        progress_style(total_bytes.is_some()).unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn progress_style(sized: bool) -> Result<ProgressStyle, indicatif::style::TemplateError> {
    ProgressStyle::with_template(if sized {
        "{spinner} {elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {percent}% ETA {eta} | {msg}"
    } else {
        "{spinner} {elapsed_precise} {bytes} read, {bytes_per_sec} | {msg}"
    })
}

fn finish(
    s: &EmbedSettings,
    info: &EngineInfo,
    done: WriterDone,
    (stats, devices): (EngineThreadStats, Option<Vec<DeviceReport>>),
    data: RunReport,
    t0: Instant,
    progress: &mut Progress,
) -> Result<()> {
    let resumed = progress.resumed;
    let expected = data.stages.sequences;
    // Every record, sequence and pack accounted for, resumed or not; a violation is a bug.
    data.check_consumer(stats.packs, done.sequences)
        .map_err(|e| anyhow!("internal error: the run's accounting does not add up: {e}"))?;
    let summary: FinishSummary = match done.writer.finish(expected) {
        Ok(summary) => summary,
        Err(e) => {
            if let OutputError::Finish { sequences, .. } = &e {
                progress.sequences_kept = *sequences;
            }
            return Err(e).with_context(|| format!("cannot finish {}", s.out.display()));
        }
    };
    progress.work_kept = None;
    let p = &data.packing;
    let padding_fraction = if p.tokens + p.unused_budget > 0 {
        p.unused_budget as f64 / (p.tokens + p.unused_budget) as f64
    } else {
        0.0
    };
    let busy = stats.busy_fraction();
    let report = EmbedReport {
        virnuc_trt_version: env!("CARGO_PKG_VERSION"),
        output: summary.path.clone(),
        output_precision: s.precision.as_str(),
        model: info.model_path.clone(),
        model_name: info.metadata.model.name.clone(),
        attention: info.metadata.attention.clone(),
        model_precision: info.metadata.precision.clone(),
        random_weights: info.metadata.random_weights,
        ep: info.ep,
        ep_note: info.ep_note.clone(),
        onnx_runtime: info.ort_version.clone(),
        onnx_runtime_library: info.ort_library.clone(),
        records: data.records_read,
        sequences: summary.sequences,
        sequences_this_run: done.sequences,
        sequences_skipped_resume: data.skipped_resume,
        packs: stats.packs,
        tokens: stats.tokens,
        residues: p.residues,
        padding_tokens: p.unused_budget,
        padding_fraction,
        token_budget: s.toks_per_batch,
        wall_s: t0.elapsed().as_secs_f64(),
        engine_open_s: stats.open_s,
        warmup_s: stats.warmup_s,
        embed_wall_s: stats.wall_s,
        tokens_per_s: rate(stats.tokens, stats.wall_s),
        sequences_per_s: rate(stats.sequences, stats.wall_s),
        engine_busy_fraction: busy,
        engine_idle_fraction: if stats.packs > 0 { 1.0 - busy } else { 0.0 },
        engine_starved_s: stats.starved_s,
        output_bytes: summary.bytes,
        shards: summary.shards,
        resumed,
        devices,
        data,
    };
    let shard_note = match &report.data.input_shard {
        Some(shard) => format!(
            ", input shard {shard}: {} of {} records, the others left to the other shards",
            report.data.records_read - report.data.records_other_shards,
            report.data.records_read
        ),
        None => String::new(),
    };
    eprintln!(
        "virnuc-trt: wrote {} sequences to {} ({} on {}, {:.0} tokens/s, engine busy {:.1}%{shard_note})",
        summary.sequences,
        summary.path.display(),
        report.model_name,
        report.ep,
        report.tokens_per_s,
        100.0 * busy
    );
    print_alterations(&report.data);
    emit_report(s, &report)
}

/// Writes a report to --report (atomically when it is a regular file) or to standard output.
fn emit_report(s: &EmbedSettings, report: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("run report")?;
    let failed = |path: &Path| {
        exit::OutputFailure(format!("cannot write the run report {}", path.display()))
    };
    match &s.report {
        Some(path) if is_special(path) => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{json}\n").as_bytes()))
            .map_err(|e| anyhow!(e).context(failed(path))),
        Some(path) => write_atomic(path, format!("{json}\n").as_bytes())
            .map_err(|e| anyhow!(e).context(failed(path))),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(json.as_bytes())?;
            out.write_all(b"\n")?;
            out.flush()?;
            Ok(())
        }
    }
}

/// One line on standard error naming everything the run changed in or left out of the input (the
/// run report has the same counters), so that none of it goes unnoticed.
pub fn print_alterations(data: &RunReport) {
    let what = data.alterations();
    if !what.is_empty() {
        eprintln!("virnuc-trt: note: input changed: {}", what.join(", "));
    }
}

/// An existing path that is not a regular file (`/dev/stdout`, a FIFO): written in place, never
/// replaced by a rename.
fn is_special(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Refuses a --report that cannot be written, before any work.
fn precheck_report(s: &EmbedSettings) -> Result<()> {
    let Some(path) = &s.report else {
        return Ok(());
    };
    let bad = |why: String| -> Result<()> {
        Err(exit::OutputFailure(format!(
            "cannot write the run report {}: {why}",
            path.display()
        ))
        .into())
    };
    if path.is_dir() {
        return bad("it is a folder; give a .json file path".into());
    }
    if is_special(path) {
        return match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(_) => Ok(()),
            Err(e) => bad(e.to_string()),
        };
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return bad(format!("folder {} does not exist", parent.display()));
    }
    let probe = parent.join(format!(".virnuc-trt-report-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bad(e.to_string()),
    }
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Temp file beside the target, then rename: readers never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use virnuc_core::{PackedBatch, SequenceMeta};

    /// A terminal that keeps the last line drawn.
    #[derive(Debug, Clone, Default)]
    struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            160
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if let Ok(mut line) = self.0.lock() {
                line.push_str(s);
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            if let Ok(mut line) = self.0.lock() {
                line.clear();
            }
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn draw(total: Option<u64>, read: u64) -> String {
        let screen = Screen::default();
        let bar = ProgressBar::with_draw_target(
            total,
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
        );
        bar.set_style(progress_style(total.is_some()).expect("template"));
        bar.set_message("12 sequences");
        bar.set_position(read);
        bar.tick();
        screen.0.lock().expect("screen").clone()
    }

    #[test]
    fn regression_progress_shows_bytes_of_total_with_percent_and_eta() {
        let line = draw(Some(4 << 20), 1 << 20);
        for want in ["1.00 MiB/4.00 MiB", "25%", "ETA ", "12 sequences"] {
            assert!(line.contains(want), "{want:?} not in {line:?}");
        }
        // Standard input: no total, a rate.
        let line = draw(None, 3 << 20);
        assert!(
            line.contains("3.00 MiB read") && line.contains("/s"),
            "{line:?}"
        );
        assert!(!line.contains('%'), "{line:?}");
    }

    #[test]
    fn select_keeps_rows_and_rebases_token_states() {
        let mut b = PackedBatch::default();
        for (i, len) in [3usize, 4, 5].iter().enumerate() {
            b.push(
                SequenceMeta {
                    index: i as u64,
                    record: 0,
                    id: format!("s{i}"),
                    residues: (*len - 2) as u32,
                },
                &vec![5u8; *len],
            );
        }
        let h = 2;
        let emb = virnuc_engine::Embeddings {
            mean: (0..6).map(|x| x as f32).collect(),
            hidden: Some((0..24).map(|x| x as f32).collect()),
            hidden_size: h,
            compute: Duration::ZERO,
        };
        let sel = select(&b, &emb, &[0, 2]);
        assert_eq!(
            sel.sequences.iter().map(|m| m.index).collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(sel.mean, [0.0, 1.0, 4.0, 5.0]);
        let (rows, cu) = sel.states.expect("states");
        assert_eq!(cu, [0, 3, 8]);
        // Sequence 0: tokens 0..3; sequence 2: tokens 7..12.
        let want: Vec<f32> = (0..6).chain(14..24).map(|x| x as f32).collect();
        assert_eq!(rows, want);
    }
}
