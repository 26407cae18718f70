//! `--devices` (of `embed` and `predict`): one worker process per device under one command.
//!
//! A run has one or more models (embed: one; predict: DNABERT-S and ESM-2, on the same device),
//! each given by a [`ModelRun`]. The parent reads, translates and packs the input (the usual
//! pipeline), tags each pack with the model it is for, and writes the one output; workers only run
//! the engines. [`Engines`] is what a subcommand sees: the models in this process (no `--devices`)
//! or a [`DevicePool`] of workers, with the same calls either way. Each worker is this binary (the
//! parent's own subcommand and arguments and a hidden `--worker-slot`), which opens every model of
//! the run on its device ([`serve`]), reads packs on its standard input and answers with their
//! embeddings on its standard output, in a little-endian framing (below). A dispatcher hands each
//! pack to a worker with fewer than [`IN_FLIGHT`] packs outstanding, so a slower device takes
//! fewer. Packs are the ones a single process makes, so every embedding is computed in the same
//! pack as there and the output is the same file.
//!
//! A worker that dies (crash, OOM, GPU fault: its pipe closes) has its outstanding packs handed
//! out again and is started once more on its device; if it dies again, the others take its share
//! and the run report names it. When no worker is left the run fails; the writer refuses to finish
//! with a gap in any case.
//!
//! Fault injection for tests: `VIRNUC_FAULT_KILL_WORKER=k:n` makes worker `k` exit after sending
//! `n` results in its first life (`k:n:every`: in every life).
//!
//! Framing. Parent → worker, per pack: `u64 pack id | u32 model | u32 sequences | u32 tokens | u32
//! max_seqlen`,
//! per sequence `u64 index | u64 record | u32 residues | u32 id length | id`, then `tokens` × i64
//! input ids, `tokens` × i64 position ids, `sequences + 1` × i32 cu_seqlens. Worker → parent: one
//! hello (`u32 length | JSON` list of each model's engine description), then per pack `u64 pack id | f64
//! compute seconds | u32 rows | u32 hidden | rows × hidden f32 | u8 per-token | [u64 n | n f32]`;
//! a pack id of `u64::MAX` carries an error message (`u32 length | text`) instead.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use crossbeam_channel::{Receiver, Select, Sender, bounded, select, unbounded};
use serde::{Deserialize, Serialize};
use virnuc_core::{PackedBatch, SequenceMeta};
use virnuc_engine::{
    Embeddings, EngineInfo, EngineOptions, EngineThread, EngineThreadStats, JobResult,
};

/// Packs outstanding per worker: one computing, one waiting in its pipe.
pub const IN_FLIGHT: usize = 2;
const ERROR_ID: u64 = u64::MAX;

/// The devices of `--devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    Gpus(Vec<i32>),
    /// `cpu:N`: N worker processes on the CPU provider (tests, or many-core hosts).
    Cpu(usize),
}

impl DeviceList {
    /// `0,1,2,3`, `all` (every visible GPU), or `cpu:N`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(n) = text.strip_prefix("cpu:") {
            return match n.parse::<usize>() {
                Ok(n) if (1..=256).contains(&n) => Ok(Self::Cpu(n)),
                _ => Err(format!("--devices {text}: cpu:N needs 1 <= N <= 256")),
            };
        }
        if text == "all" {
            return visible_gpus().map(Self::Gpus);
        }
        let mut list = Vec::new();
        for item in text.split(',') {
            match item.trim().parse::<i32>() {
                Ok(d) if (0..=1024).contains(&d) && !list.contains(&d) => list.push(d),
                _ => {
                    return Err(format!(
                        "--devices {text}: expected GPU indices like 0,1,2,3 (each once), all, or cpu:N"
                    ));
                }
            }
        }
        Ok(Self::Gpus(list))
    }

    /// `--devices TEXT` for a run on provider `ep`: CPU workers only with `--ep cpu`, GPUs only
    /// off it.
    pub fn for_ep(text: &str, ep: virnuc_engine::Ep) -> Result<Self, String> {
        let list = Self::parse(text)?;
        match (&list, ep) {
            (Self::Cpu(_), virnuc_engine::Ep::Cpu) => Ok(list),
            (Self::Cpu(_), _) => Err("--devices cpu:N runs CPU workers: give --ep cpu too".into()),
            (Self::Gpus(_), virnuc_engine::Ep::Cpu) => {
                Err("--devices with --ep cpu: use cpu:N (N CPU worker processes)".into())
            }
            _ => Ok(list),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Gpus(g) => g.len(),
            Self::Cpu(n) => *n,
        }
    }

    fn device(&self, k: usize) -> i32 {
        match self {
            Self::Gpus(g) => g[k],
            Self::Cpu(_) => 0,
        }
    }

    fn name(&self, k: usize) -> String {
        match self {
            Self::Gpus(g) => format!("cuda:{}", g[k]),
            Self::Cpu(_) => format!("cpu-worker-{k}"),
        }
    }
}

/// GPUs this process may use: `CUDA_VISIBLE_DEVICES` if set, else those `nvidia-smi -L` lists.
fn visible_gpus() -> Result<Vec<i32>, String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let n = v.split(',').filter(|s| !s.trim().is_empty()).count();
        return if n == 0 {
            Err("--devices all: CUDA_VISIBLE_DEVICES is empty".into())
        } else {
            Ok((0..n as i32).collect())
        };
    }
    let out = Command::new("nvidia-smi").arg("-L").output().map_err(|e| {
        format!("--devices all: cannot run nvidia-smi to count GPUs ({e}); list them (0,1,...)")
    })?;
    let n = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("GPU "))
        .count();
    if n == 0 {
        return Err("--devices all: nvidia-smi lists no GPU".into());
    }
    Ok((0..n as i32).collect())
}

/// Hidden `--worker-slot K,DEVICE,LIFE` of a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSlot {
    pub index: usize,
    pub device: i32,
    pub life: u32,
}

impl std::str::FromStr for WorkerSlot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("worker slot {s:?}");
        let mut it = s.split(',');
        let mut next = || it.next().ok_or_else(bad);
        Ok(Self {
            index: next()?.parse().map_err(|_| bad())?,
            device: next()?.parse().map_err(|_| bad())?,
            life: next()?.parse().map_err(|_| bad())?,
        })
    }
}

/// `VIRNUC_FAULT_KILL_WORKER`: after how many results this worker exits, if at all.
fn fault_for(slot: WorkerSlot) -> Option<u64> {
    let spec = std::env::var("VIRNUC_FAULT_KILL_WORKER").ok()?;
    let mut it = spec.split(':');
    let k: usize = it.next()?.parse().ok()?;
    let n: u64 = it.next()?.parse().ok()?;
    let every = it.next() == Some("every");
    (k == slot.index && (slot.life == 0 || every)).then_some(n)
}

/// What a worker tells the parent about its engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    ep: String,
    ep_note: Option<String>,
    metadata: virnuc_core::ModelMetadata,
    model_path: std::path::PathBuf,
    ort_library: std::path::PathBuf,
    ort_version: String,
    hidden_size: usize,
    per_token: bool,
    open_s: f64,
    warmup_s: f64,
}

fn ep_static(name: &str) -> &'static str {
    match name {
        "cpu" => "cpu",
        "cuda" => "cuda",
        "tensorrt" => "tensorrt",
        _ => "unknown",
    }
}

impl Hello {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            ep: ep_static(&self.ep),
            ep_note: self.ep_note.clone(),
            metadata: self.metadata.clone(),
            model_path: self.model_path.clone(),
            ort_library: self.ort_library.clone(),
            ort_version: self.ort_version.clone(),
            hidden_size: self.hidden_size,
            per_token: self.per_token,
        }
    }
}

// ---- framing ----

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn encode_pack(id: u64, model: usize, b: &PackedBatch, out: &mut Vec<u8>) {
    out.clear();
    put_u64(out, id);
    put_u32(out, model as u32);
    put_u32(out, b.sequences.len() as u32);
    put_u32(out, b.input_ids.len() as u32);
    put_u32(out, b.max_seqlen as u32);
    for m in &b.sequences {
        put_u64(out, m.index);
        put_u64(out, m.record);
        put_u32(out, m.residues);
        put_u32(out, m.id.len() as u32);
        out.extend_from_slice(m.id.as_bytes());
    }
    for v in &b.input_ids {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in &b.position_ids {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in &b.cu_seqlens {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

struct Frames<R: Read> {
    r: R,
}

impl<R: Read> Frames<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }
    fn vec(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.r.read_exact(&mut v)?;
        Ok(v)
    }
    fn string(&mut self, n: usize) -> std::io::Result<String> {
        String::from_utf8(self.vec(n)?)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "id is not UTF-8"))
    }
    fn f32s(&mut self, n: usize) -> std::io::Result<Vec<f32>> {
        Ok(self
            .vec(n * 4)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The next pack and the model it is for, or `None` at a clean end of stream.
    fn pack(&mut self) -> std::io::Result<Option<(u64, usize, PackedBatch)>> {
        let id = match self.u64() {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        let model = self.u32()? as usize;
        let n = self.u32()? as usize;
        let t = self.u32()? as usize;
        let max_seqlen = self.u32()? as usize;
        let mut sequences = Vec::with_capacity(n);
        for _ in 0..n {
            let index = self.u64()?;
            let record = self.u64()?;
            let residues = self.u32()?;
            let len = self.u32()? as usize;
            let id = self.string(len)?;
            sequences.push(SequenceMeta {
                index,
                record,
                id,
                residues,
            });
        }
        let i64s = |v: Vec<u8>| -> Vec<i64> {
            v.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect()
        };
        let input_ids = i64s(self.vec(t * 8)?);
        let position_ids = i64s(self.vec(t * 8)?);
        let cu_seqlens = self
            .vec((n + 1) * 4)?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Some((
            id,
            model,
            PackedBatch {
                input_ids,
                position_ids,
                cu_seqlens,
                max_seqlen,
                sequences,
            },
        )))
    }
}

// ---- the models of a run ----

/// One model of a run: how its engine opens, and the pack size to warm it up with (GPUs).
#[derive(Debug, Clone)]
pub struct ModelRun {
    /// For messages: "the engine for NAME", "NAME inference failed".
    pub name: String,
    pub options: EngineOptions,
    pub warmup: Option<usize>,
}

/// Results of one model's packs, in the order the engine finished them.
pub type Results = Receiver<Result<JobResult, virnuc_engine::EngineError>>;

/// What the engines did: totals per model (in [`ModelRun`] order) and, under `--devices`, each
/// device's part.
#[derive(Debug, Clone, Default)]
pub struct EnginesDone {
    pub models: Vec<EngineThreadStats>,
    pub devices: Option<Vec<DeviceReport>>,
}

/// The engines of a run: every model in this process, or one worker process per device each
/// holding every model. Packs go in with the number of their model; each model's results come out
/// of its own channel.
pub enum Engines {
    Local(Vec<(String, EngineThread)>),
    Pool(DevicePool),
}

impl Engines {
    /// Opens the models here (`devices` = `None`) or starts one worker per device (each opens all
    /// of them); `queue` packs wait ahead of each model.
    pub fn start(
        models: Vec<ModelRun>,
        devices: Option<&DeviceList>,
        queue: usize,
    ) -> Result<(Self, Vec<Results>)> {
        match devices {
            Some(list) => {
                let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
                let own_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                let (pool, results) =
                    DevicePool::spawn(own_args, list.clone(), models.len(), queue).with_context(
                        || {
                            format!(
                                "cannot start the device workers for {}",
                                names.join(" and ")
                            )
                        },
                    )?;
                Ok((Self::Pool(pool), results))
            }
            None => {
                let mut engines = Vec::with_capacity(models.len());
                let mut results = Vec::with_capacity(models.len());
                for m in models {
                    let (engine, r) = EngineThread::spawn(m.options, m.warmup, queue)
                        .with_context(|| format!("cannot start the engine for {}", m.name))?;
                    engines.push((m.name, engine));
                    results.push(r);
                }
                Ok((Self::Local(engines), results))
            }
        }
    }

    /// The engine of model `model` (under `--devices`: as the first worker opened it).
    pub fn info(&self, model: usize) -> &EngineInfo {
        match self {
            Self::Local(e) => e[model.min(e.len() - 1)].1.info(),
            Self::Pool(p) => p.info(model),
        }
    }

    pub fn submit(&self, model: usize, batch: PackedBatch) -> Result<()> {
        match self {
            Self::Local(e) => e
                .get(model)
                .ok_or_else(|| anyhow!("internal error: a pack for model {model}"))?
                .1
                .submit(batch)
                .map_err(|e| anyhow!(e)),
            Self::Pool(p) => p.submit(model, batch),
        }
    }

    /// Waits for every pack to be done. The first model whose engine failed is the error.
    pub fn finish(self) -> Result<EnginesDone> {
        match self {
            Self::Local(engines) => {
                let mut models = Vec::with_capacity(engines.len());
                let mut first_error = None;
                for (name, e) in engines {
                    match e.finish() {
                        Ok(s) => models.push(s),
                        Err(err) => {
                            first_error.get_or_insert_with(|| {
                                anyhow!(err).context(format!("{name} inference failed"))
                            });
                        }
                    }
                }
                match first_error {
                    Some(e) => Err(e),
                    None => Ok(EnginesDone {
                        models,
                        devices: None,
                    }),
                }
            }
            Self::Pool(p) => p.finish(),
        }
    }
}

// ---- the worker process ----

/// Worker mode: opens every model's engine on this worker's device, says hello, runs the packs
/// from standard input (each on its model's engine) until it closes.
pub fn serve(slot: WorkerSlot, models: Vec<ModelRun>, queue: usize) -> Result<()> {
    let t0 = Instant::now();
    let mut engines = Vec::with_capacity(models.len());
    let mut results = Vec::with_capacity(models.len());
    let mut hellos = Vec::with_capacity(models.len());
    for m in models {
        let (engine, r) = EngineThread::spawn(m.options, m.warmup, queue)
            .with_context(|| format!("cannot start the engine for {} in the worker", m.name))?;
        let info = engine.info().clone();
        hellos.push(Hello {
            ep: info.ep.to_string(),
            ep_note: info.ep_note.clone(),
            metadata: info.metadata.clone(),
            model_path: info.model_path.clone(),
            ort_library: info.ort_library.clone(),
            ort_version: info.ort_version.clone(),
            hidden_size: info.hidden_size,
            per_token: info.per_token,
            open_s: t0.elapsed().as_secs_f64(),
            warmup_s: 0.0,
        });
        engines.push(engine);
        results.push(r);
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let json = serde_json::to_vec(&hellos)?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.flush()?;
    let fault = fault_for(slot);
    // Pack ids travel beside each engine in submission order (an engine thread keeps it).
    let (ids_tx, ids_rx): (Vec<Sender<u64>>, Vec<Receiver<u64>>) =
        (0..engines.len()).map(|_| unbounded::<u64>()).unzip();
    let feeder = std::thread::Builder::new()
        .name("virnuc-worker-in".into())
        .spawn(move || -> Result<()> {
            let mut frames = Frames {
                r: BufReader::with_capacity(1 << 20, std::io::stdin().lock()),
            };
            while let Some((id, model, batch)) =
                frames.pack().context("reading a pack from the parent")?
            {
                let (Some(engine), Some(ids)) = (engines.get(model), ids_tx.get(model)) else {
                    bail!("the parent sent a pack for model {model}");
                };
                ids.send(id).map_err(|_| anyhow!("worker stopped"))?;
                if engine.submit(batch).is_err() {
                    break;
                }
            }
            drop(ids_tx);
            for engine in engines {
                engine.finish().map_err(|e| anyhow!(e))?;
            }
            Ok(())
        })?;
    let mut sent = 0u64;
    let mut buf = Vec::new();
    let mut open: Vec<bool> = vec![true; results.len()];
    while open.iter().any(|&o| o) {
        let mut sel = Select::new();
        let live: Vec<usize> = (0..results.len()).filter(|&k| open[k]).collect();
        for &k in &live {
            sel.recv(&results[k]);
        }
        let op = sel.select();
        let k = live[op.index()];
        let r = match op.recv(&results[k]) {
            Ok(r) => r,
            Err(_) => {
                open[k] = false;
                continue;
            }
        };
        let id = ids_rx[k]
            .recv()
            .map_err(|_| anyhow!("pack ids out of step"))?;
        match r {
            Ok(JobResult { embeddings: e, .. }) => {
                if fault == Some(sent) {
                    // A crash as the parent sees one: the pipe closes with packs outstanding.
                    std::process::exit(137);
                }
                buf.clear();
                put_u64(&mut buf, id);
                buf.extend_from_slice(&e.compute.as_secs_f64().to_le_bytes());
                put_u32(&mut buf, (e.mean.len() / e.hidden_size.max(1)) as u32);
                put_u32(&mut buf, e.hidden_size as u32);
                for v in &e.mean {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                match &e.hidden {
                    Some(h) => {
                        buf.push(1);
                        put_u64(&mut buf, h.len() as u64);
                        for v in h {
                            buf.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                    None => buf.push(0),
                }
                out.write_all(&buf)?;
                out.flush()?;
                sent += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                buf.clear();
                put_u64(&mut buf, ERROR_ID);
                put_u32(&mut buf, msg.len() as u32);
                buf.extend_from_slice(msg.as_bytes());
                out.write_all(&buf)?;
                out.flush()?;
                bail!("{msg}");
            }
        }
    }
    feeder
        .join()
        .map_err(|_| anyhow!("the worker's input thread panicked"))?
}

// ---- the parent ----

/// One device's part of the run report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceReport {
    pub device: String,
    /// Packs of every model of the run.
    pub packs: u64,
    pub sequences: u64,
    pub tokens: u64,
    /// Σ engine run time / the run's wall time (several models on one device can add up to more
    /// than one; capped at 1).
    pub busy_fraction: f64,
    /// Times the worker was started again after dying.
    pub restarts: u32,
    /// The worker died twice: the others took its packs.
    pub failed: bool,
    /// What ended each of its lives that did not end normally.
    pub deaths: Vec<String>,
}

enum Event {
    Done {
        worker: usize,
        life: u32,
        id: u64,
        compute: f64,
        mean: Vec<f32>,
        hidden: Option<Vec<f32>>,
        hidden_size: usize,
    },
    Died {
        worker: usize,
        life: u32,
        why: String,
    },
}

/// A pack handed out: its model and its contents (kept until its result is in).
type Handed = (u64, usize, std::sync::Arc<PackedBatch>);

struct Worker {
    child: Child,
    input: Option<Sender<Handed>>,
    life: u32,
    outstanding: Vec<u64>,
    alive: bool,
}

struct Spawner {
    args: Vec<std::ffi::OsString>,
    devices: DeviceList,
    models: usize,
    events: Sender<Event>,
}

impl Spawner {
    /// Starts worker `k` (life `life`) and waits for its hello (one engine per model).
    fn start(&self, k: usize, life: u32) -> Result<(Worker, Vec<Hello>)> {
        let slot = format!("{k},{},{life}", self.devices.device(k));
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .arg("--worker-slot")
            .arg(&slot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the worker for {}", self.devices.name(k)))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("worker without stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker without stdout"))?;
        let mut frames = Frames {
            r: BufReader::with_capacity(1 << 20, stdout),
        };
        let hello = (|| -> std::io::Result<Vec<Hello>> {
            let n = frames.u32()? as usize;
            let json = frames.vec(n)?;
            serde_json::from_slice(&json)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })();
        let hello = match hello {
            Ok(h) if h.len() == self.models => h,
            Ok(h) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the worker for {} opened {} models, not {}",
                    self.devices.name(k),
                    h.len(),
                    self.models
                );
            }
            Err(e) => {
                let status = child.wait().ok();
                bail!(
                    "the worker for {} did not start ({e}; exit {status:?}; its error is above)",
                    self.devices.name(k)
                );
            }
        };
        let (tx, rx) = unbounded::<Handed>();
        std::thread::Builder::new()
            .name(format!("virnuc-to-worker-{k}"))
            .spawn(move || feed_worker(stdin, rx))?;
        let events = self.events.clone();
        std::thread::Builder::new()
            .name(format!("virnuc-from-worker-{k}"))
            .spawn(move || read_worker(k, life, frames, events))?;
        Ok((
            Worker {
                child,
                input: Some(tx),
                life,
                outstanding: Vec::new(),
                alive: true,
            },
            hello,
        ))
    }
}

fn feed_worker(stdin: ChildStdin, rx: Receiver<Handed>) {
    let mut out = BufWriter::with_capacity(1 << 20, stdin);
    let mut buf = Vec::new();
    for (id, model, batch) in rx {
        encode_pack(id, model, &batch, &mut buf);
        // A write error means the worker died; its reader reports that.
        if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

fn read_worker(
    worker: usize,
    life: u32,
    mut frames: Frames<BufReader<ChildStdout>>,
    events: Sender<Event>,
) {
    let why = loop {
        let id = match frames.u64() {
            Ok(id) => id,
            Err(_) => break "its output ended (the process died)".to_string(),
        };
        let result = (|| -> std::io::Result<Event> {
            if id == ERROR_ID {
                let n = frames.u32()? as usize;
                let msg = frames.string(n)?;
                return Ok(Event::Died {
                    worker,
                    life,
                    why: format!("engine error: {msg}"),
                });
            }
            let compute = f64::from_le_bytes(frames.bytes::<8>()?);
            let rows = frames.u32()? as usize;
            let hidden_size = frames.u32()? as usize;
            let mean = frames.f32s(rows * hidden_size)?;
            let flag = frames.bytes::<1>()?[0];
            let hidden = if flag == 1 {
                let n = frames.u64()? as usize;
                Some(frames.f32s(n)?)
            } else {
                None
            };
            Ok(Event::Done {
                worker,
                life,
                id,
                compute,
                mean,
                hidden,
                hidden_size,
            })
        })();
        match result {
            Ok(e @ Event::Died { .. }) => {
                let _ = events.send(e);
                return;
            }
            Ok(e) => {
                if events.send(e).is_err() {
                    return;
                }
            }
            Err(e) => break format!("its output broke off ({e})"),
        }
    };
    let _ = events.send(Event::Died { worker, life, why });
}

/// The workers of one `--devices` run, used through [`Engines`].
pub struct DevicePool {
    packs: Option<Sender<(usize, PackedBatch)>>,
    dispatcher: Option<std::thread::JoinHandle<Result<EnginesDone>>>,
    infos: Vec<EngineInfo>,
}

impl DevicePool {
    /// Starts one worker per device with this process's own arguments (`args`, without the
    /// program name), each opening the run's `models` engines, and waits until every one has
    /// them open. Returns one result channel per model.
    fn spawn(
        args: Vec<std::ffi::OsString>,
        devices: DeviceList,
        models: usize,
        queue: usize,
    ) -> Result<(Self, Vec<Results>)> {
        let (events_tx, events_rx) = unbounded::<Event>();
        let spawner = Spawner {
            args,
            devices,
            models,
            events: events_tx,
        };
        let t0 = Instant::now();
        let mut workers = Vec::new();
        let mut hello = None;
        for k in 0..spawner.devices.len() {
            let (w, h) = spawner.start(k, 0)?;
            workers.push(w);
            hello.get_or_insert(h);
        }
        let hello = hello.ok_or_else(|| anyhow!("--devices lists no device"))?;
        let open_s = t0.elapsed().as_secs_f64();
        let (packs_tx, packs_rx) = bounded::<(usize, PackedBatch)>(queue.max(1));
        let (out_tx, out_rx): (Vec<_>, Vec<_>) =
            (0..models).map(|_| bounded(queue.max(1) * 4)).unzip();
        let dispatcher = std::thread::Builder::new()
            .name("virnuc-dispatcher".into())
            .spawn(move || dispatch(spawner, workers, events_rx, packs_rx, out_tx, open_s))?;
        Ok((
            Self {
                packs: Some(packs_tx),
                dispatcher: Some(dispatcher),
                infos: hello.iter().map(Hello::info).collect(),
            },
            out_rx,
        ))
    }

    fn info(&self, model: usize) -> &EngineInfo {
        &self.infos[model.min(self.infos.len() - 1)]
    }

    fn submit(&self, model: usize, batch: PackedBatch) -> Result<()> {
        if model >= self.infos.len() {
            bail!("internal error: a pack for model {model}");
        }
        self.packs
            .as_ref()
            .ok_or_else(|| anyhow!("already finished"))?
            .send((model, batch))
            .map_err(|_| anyhow!("the devices stopped (see the error reported with the results)"))
    }

    fn finish(mut self) -> Result<EnginesDone> {
        self.packs.take();
        self.dispatcher
            .take()
            .ok_or_else(|| anyhow!("already finished"))?
            .join()
            .map_err(|_| anyhow!("the dispatcher thread panicked"))?
    }
}

fn dispatch(
    spawner: Spawner,
    mut workers: Vec<Worker>,
    events: Receiver<Event>,
    packs: Receiver<(usize, PackedBatch)>,
    out: Vec<Sender<Result<JobResult, virnuc_engine::EngineError>>>,
    open_s: f64,
) -> Result<EnginesDone> {
    let n = workers.len();
    let mut reports: Vec<DeviceReport> = (0..n)
        .map(|k| DeviceReport {
            device: spawner.devices.name(k),
            ..DeviceReport::default()
        })
        .collect();
    let mut busy = vec![0f64; n];
    let mut model_busy = vec![0f64; out.len()];
    let mut table: HashMap<u64, (usize, std::sync::Arc<PackedBatch>)> = HashMap::new();
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut next_id = 0u64;
    let mut input_open = true;
    let mut first: Option<Instant> = None;
    let mut stats: Vec<EngineThreadStats> = (0..out.len())
        .map(|_| EngineThreadStats {
            open_s,
            ..EngineThreadStats::default()
        })
        .collect();
    let mut take_in = |(model, batch): (usize, PackedBatch),
                       table: &mut HashMap<u64, (usize, std::sync::Arc<PackedBatch>)>|
     -> u64 {
        first.get_or_insert_with(Instant::now);
        let id = next_id;
        next_id += 1;
        table.insert(id, (model, std::sync::Arc::new(batch)));
        id
    };
    // Packs outstanding per worker: [`IN_FLIGHT`] for each of its engines.
    let in_flight = IN_FLIGHT * out.len().max(1);
    let result = loop {
        // Hand out work while some live worker has room: retried packs first.
        while let Some(k) = (0..n)
            .filter(|&k| workers[k].alive && workers[k].outstanding.len() < in_flight)
            .min_by_key(|&k| workers[k].outstanding.len())
        {
            let id = if let Some(id) = retry.pop_front() {
                id
            } else if input_open {
                match packs.try_recv() {
                    Ok(p) => take_in(p, &mut table),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        input_open = false;
                        break;
                    }
                }
            } else {
                break;
            };
            let (model, batch) = table
                .get(&id)
                .cloned()
                .ok_or_else(|| anyhow!("pack {id} lost"))?;
            let w = &mut workers[k];
            w.outstanding.push(id);
            if let Some(tx) = &w.input {
                let _ = tx.send((id, model, batch));
            }
        }
        if !input_open && table.is_empty() {
            break Ok(());
        }
        if workers.iter().all(|w| !w.alive) {
            break Err(anyhow::Error::new(crate::exit::EngineFailure(format!(
                "every device worker died; {} packs not done ({})",
                table.len(),
                reports
                    .iter()
                    .map(|r| format!("{}: {}", r.device, r.deaths.join("; ")))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ))));
        }
        if !input_open
            && retry.is_empty()
            && workers.iter().all(|w| w.outstanding.is_empty())
            && !table.is_empty()
        {
            break Err(anyhow!(
                "internal error: {} packs were handed out and never came back",
                table.len()
            ));
        }
        let has_room = workers
            .iter()
            .any(|w| w.alive && w.outstanding.len() < in_flight);
        let event = if input_open && has_room && retry.is_empty() {
            select! {
                recv(events) -> e => e.ok(),
                recv(packs) -> p => {
                    match p {
                        Ok(p) => {
                            let id = take_in(p, &mut table);
                            retry.push_back(id);
                        }
                        Err(_) => input_open = false,
                    }
                    continue;
                }
            }
        } else {
            events.recv_timeout(Duration::from_secs(3600)).ok()
        };
        let Some(event) = event else {
            break Err(anyhow!("no word from any device worker for an hour"));
        };
        match event {
            Event::Done {
                worker,
                life,
                id,
                compute,
                mean,
                hidden,
                hidden_size,
            } => {
                let w = &mut workers[worker];
                if w.life != life || !w.outstanding.contains(&id) {
                    continue; // a late answer of a worker since replaced
                }
                w.outstanding.retain(|&x| x != id);
                let Some((model, batch)) = table.remove(&id) else {
                    continue;
                };
                let r = &mut reports[worker];
                r.packs += 1;
                r.sequences += batch.num_sequences() as u64;
                r.tokens += batch.num_tokens() as u64;
                busy[worker] += compute;
                model_busy[model] += compute;
                let s = &mut stats[model];
                s.packs += 1;
                s.sequences += batch.num_sequences() as u64;
                s.tokens += batch.num_tokens() as u64;
                let batch = std::sync::Arc::try_unwrap(batch).unwrap_or_else(|a| (*a).clone());
                let job = JobResult {
                    batch,
                    embeddings: Embeddings {
                        mean,
                        hidden,
                        hidden_size,
                        compute: Duration::from_secs_f64(compute),
                    },
                };
                if out[model].send(Ok(job)).is_err() {
                    break Err(anyhow!("the writer stopped"));
                }
            }
            Event::Died { worker, life, why } => {
                let w = &mut workers[worker];
                if w.life != life || !w.alive {
                    continue;
                }
                w.alive = false;
                w.input.take();
                let _ = w.child.kill();
                let status = w.child.wait().ok();
                let mut lost: Vec<u64> = std::mem::take(&mut w.outstanding);
                lost.sort_unstable();
                for id in lost.into_iter().rev() {
                    retry.push_front(id);
                }
                let r = &mut reports[worker];
                r.deaths.push(format!(
                    "{why}{}",
                    status.map(|s| format!(", {s}")).unwrap_or_default()
                ));
                eprintln!(
                    "virnuc-trt: worker on {} died ({why}); its packs go to the others",
                    r.device
                );
                if r.restarts == 0 {
                    r.restarts = 1;
                    match spawner.start(worker, life + 1) {
                        Ok((fresh, _)) => {
                            eprintln!("virnuc-trt: worker on {} started again", r.device);
                            workers[worker] = fresh;
                        }
                        Err(e) => {
                            r.failed = true;
                            r.deaths.push(format!("restart failed: {e:#}"));
                        }
                    }
                } else {
                    r.failed = true;
                }
            }
        }
    };
    for w in &mut workers {
        w.input.take();
    }
    for w in &mut workers {
        if result.is_err() {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
    result?;
    let wall = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    for (k, r) in reports.iter_mut().enumerate() {
        r.busy_fraction = if wall > 0.0 {
            (busy[k] / wall).min(1.0)
        } else {
            0.0
        };
    }
    for (s, b) in stats.iter_mut().zip(&model_busy) {
        s.wall_s = wall;
        // The model's busy share of the run: the mean over the devices.
        s.busy_s = b / n.max(1) as f64;
    }
    Ok(EnginesDone {
        models: stats,
        devices: Some(reports),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(
            DeviceList::parse("0,1,3"),
            Ok(DeviceList::Gpus(vec![0, 1, 3]))
        );
        assert_eq!(DeviceList::parse("cpu:2"), Ok(DeviceList::Cpu(2)));
        for bad in ["", "0,0", "-1", "cpu:0", "cpu:x", "a,b", "cpu:1000"] {
            assert!(DeviceList::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            "1,3,0".parse::<WorkerSlot>(),
            Ok(WorkerSlot {
                index: 1,
                device: 3,
                life: 0
            })
        );
    }

    #[test]
    fn device_lists_must_fit_the_provider() {
        use virnuc_engine::Ep;
        assert_eq!(DeviceList::for_ep("cpu:2", Ep::Cpu), Ok(DeviceList::Cpu(2)));
        assert_eq!(
            DeviceList::for_ep("0,1", Ep::Cuda),
            Ok(DeviceList::Gpus(vec![0, 1]))
        );
        assert!(DeviceList::for_ep("cpu:2", Ep::Auto).is_err_and(|e| e.contains("--ep cpu")));
        assert!(DeviceList::for_ep("0,1", Ep::Cpu).is_err_and(|e| e.contains("cpu:N")));
    }

    #[test]
    fn packs_round_trip_through_the_framing() {
        let mut b = PackedBatch::default();
        for (i, len) in [3usize, 7, 4].iter().enumerate() {
            b.push(
                SequenceMeta {
                    index: 10 + i as u64,
                    record: 5 + i as u64,
                    id: format!("séq{i}"),
                    residues: (*len - 2) as u32,
                },
                &vec![4 + i as u8; *len],
            );
        }
        let mut buf = Vec::new();
        encode_pack(42, 1, &b, &mut buf);
        buf.extend_from_slice(&buf.clone());
        let mut frames = Frames { r: &buf[..] };
        for _ in 0..2 {
            let (id, model, got) = frames.pack().expect("reads").expect("a pack");
            assert_eq!((id, model), (42, 1));
            assert_eq!(got, b);
        }
        assert!(frames.pack().expect("clean end").is_none());
    }
}
