//! The engine on its own OS thread, fed by a bounded command channel (TEI's `BackendThread`).
//!
//! The caller's thread keeps pulling packs from the loader while the engine computes; results go
//! out on a second bounded channel to whoever writes them. Queue depths bound memory and give
//! back-pressure end to end. The engine is created inside the thread, warmed up at the largest pack
//! before the first real one, and its busy time (sum of run calls) is measured against wall time.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use virnuc_core::PackedBatch;

use crate::{Embeddings, EngineError, EngineInfo, EngineOptions, Result, open_engine};

/// A pack to embed.
#[derive(Debug)]
pub struct Job {
    pub batch: PackedBatch,
}

/// A pack with its embeddings, in submission order.
#[derive(Debug)]
pub struct JobResult {
    pub batch: PackedBatch,
    pub embeddings: Embeddings,
}

enum Command {
    Embed(Job),
}

/// Totals over the engine thread's life.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineThreadStats {
    pub packs: u64,
    pub tokens: u64,
    pub sequences: u64,
    /// Seconds spent in the session's run call (device busy, launch overhead included).
    pub busy_s: f64,
    /// Seconds from the first pack's arrival to the last pack's end.
    pub wall_s: f64,
    /// Seconds waiting for the next pack after the first (the loader not keeping up).
    pub starved_s: f64,
    pub warmup_s: f64,
    pub open_s: f64,
}

impl EngineThreadStats {
    /// busy / wall: the share of time the engine was computing (1.0 = never waited for the CPU).
    pub fn busy_fraction(&self) -> f64 {
        if self.wall_s > 0.0 {
            (self.busy_s / self.wall_s).min(1.0)
        } else {
            0.0
        }
    }
}

/// Handle to the engine thread.
#[derive(Debug)]
pub struct EngineThread {
    commands: Option<Sender<Command>>,
    handle: Option<JoinHandle<Result<EngineThreadStats>>>,
    info: EngineInfo,
}

impl EngineThread {
    /// Opens the engine on a new thread (and, on a GPU provider, warms it up with a pack of
    /// `warmup_tokens` if given).
    /// Returns once the engine is ready, or with the error that prevented it.
    ///
    /// `queue` is how many packs may wait for the engine; results go to the returned receiver,
    /// which holds at most `queue` results before the engine waits for the consumer.
    pub fn spawn(
        options: EngineOptions,
        warmup_tokens: Option<usize>,
        queue: usize,
    ) -> Result<(Self, Receiver<Result<JobResult>>)> {
        let (cmd_tx, cmd_rx) = bounded::<Command>(queue.max(1));
        let (out_tx, out_rx) = bounded::<Result<JobResult>>(queue.max(1));
        let (ready_tx, ready_rx) = bounded::<Result<EngineInfo>>(1);
        let handle = std::thread::Builder::new()
            .name("virnuc-engine".into())
            .spawn(move || run(options, warmup_tokens, cmd_rx, out_tx, ready_tx))
            .map_err(|e| EngineError::Thread(format!("cannot start: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok((
                Self {
                    commands: Some(cmd_tx),
                    handle: Some(handle),
                    info,
                },
                out_rx,
            )),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(EngineError::Thread(match handle.join() {
                Err(_) => "panicked while opening the engine".into(),
                Ok(_) => "stopped while opening the engine".into(),
            })),
        }
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Queues a pack; blocks while `queue` packs are already waiting.
    pub fn submit(&self, batch: PackedBatch) -> Result<()> {
        let tx = self
            .commands
            .as_ref()
            .ok_or_else(|| EngineError::Thread("already finished".into()))?;
        tx.send(Command::Embed(Job { batch })).map_err(|_| {
            EngineError::Thread("stopped (see the error reported with the results)".into())
        })
    }

    /// No more packs: waits for the thread and returns its totals.
    pub fn finish(mut self) -> Result<EngineThreadStats> {
        self.commands.take();
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(EngineError::Thread("panicked".into())),
            None => Err(EngineError::Thread("already finished".into())),
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(
    options: EngineOptions,
    warmup_tokens: Option<usize>,
    commands: Receiver<Command>,
    results: Sender<Result<JobResult>>,
    ready: Sender<Result<EngineInfo>>,
) -> Result<EngineThreadStats> {
    let mut stats = EngineThreadStats::default();
    let t0 = Instant::now();
    let mut engine = match open_engine(&options) {
        Ok(e) => e,
        Err(e) => {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(EngineError::Thread(msg));
        }
    };
    stats.open_s = t0.elapsed().as_secs_f64();
    // The CPU needs no warm-up (and a GPU-sized pack could take gigabytes with the masked flavor).
    if let Some(tokens) = warmup_tokens.filter(|_| engine.info().ep != "cpu") {
        let t1 = Instant::now();
        if let Err(e) = engine.warmup(tokens) {
            let msg = e.to_string();
            let _ = ready.send(Err(e));
            return Err(EngineError::Thread(msg));
        }
        stats.warmup_s = t1.elapsed().as_secs_f64();
    }
    if ready.send(Ok(engine.info().clone())).is_err() {
        return Ok(stats);
    }
    let mut first: Option<Instant> = None;
    let mut last_end = Instant::now();
    let mut busy = Duration::ZERO;
    let mut starved = Duration::ZERO;
    loop {
        let wait = Instant::now();
        let Ok(Command::Embed(job)) = commands.recv() else {
            break;
        };
        if first.is_some() {
            starved += wait.elapsed();
        }
        first.get_or_insert_with(Instant::now);
        let out = engine.embed(&job.batch);
        last_end = Instant::now();
        match out {
            Ok(embeddings) => {
                busy += embeddings.compute;
                stats.packs += 1;
                stats.tokens += job.batch.num_tokens() as u64;
                stats.sequences += job.batch.num_sequences() as u64;
                if results
                    .send(Ok(JobResult {
                        batch: job.batch,
                        embeddings,
                    }))
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = results.send(Err(e));
                return Err(EngineError::Thread(msg));
            }
        }
    }
    stats.busy_s = busy.as_secs_f64();
    stats.starved_s = starved.as_secs_f64();
    stats.wall_s = first.map_or(0.0, |f| (last_end - f).as_secs_f64());
    Ok(stats)
}
