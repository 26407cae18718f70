//! Data-path benchmark: runs the pipeline over the given inputs and consumes packs as fast as it can.
//!
//! ```text
//! cargo run --release -p virnuc-data --example bench_pipeline -- [--chunk 500] [--budget 16384]
//!     [--workers N] [--window N] [--mode nucleotide|protein] [--compat] FILE...
//! ```
//! Prints one JSON line: tokens/s delivered to the consumer, packs, utilization, peak RSS (VmHWM),
//! plus the run report's main counters. Used by `tools/bench/data/run.sh`.

use std::time::Instant;

use virnuc_data::{Mode, PipelineConfig};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = PipelineConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--chunk" => config.chunk_len = value()?.parse()?,
            "--budget" => config.token_budget = value()?.parse()?,
            "--workers" => config.workers = value()?.parse()?,
            "--window" => config.window = value()?.parse()?,
            "--prefetch" => config.prefetch = value()?.parse()?,
            "--mode" => config.mode = value()?.parse::<Mode>()?,
            "--compat" => config.virnucpro_compat = true,
            _ => config.inputs.push(a.into()),
        }
    }
    let started = Instant::now();
    let mut pipeline = virnuc_data::start(config.clone())?;
    let (mut tokens, mut packs, mut sequences) = (0u64, 0u64, 0u64);
    let mut checksum = 0i64;
    for pack in pipeline.by_ref() {
        let pack = pack?;
        tokens += pack.num_tokens() as u64;
        sequences += pack.num_sequences() as u64;
        packs += 1;
        // Touch the data so the consumer is not optimized away.
        checksum = checksum.wrapping_add(pack.input_ids[pack.input_ids.len() / 2]);
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = pipeline.finish()?;
    report.check_accounting()?;
    let input_bases: u64 = report.files.iter().map(|f| f.residues).sum();
    println!(
        "{}",
        serde_json::json!({
            "inputs": config.inputs,
            "mode": report.mode,
            "chunk_len": config.chunk_len,
            "token_budget": config.token_budget,
            "workers": config.workers,
            "seconds": seconds,
            "records": report.records_read,
            "input_residues": input_bases,
            "input_mbp_per_s": input_bases as f64 / seconds / 1e6,
            "chunks": report.stages.chunks,
            "frames_kept": report.stages.frames_kept,
            "sequences": sequences,
            "packs": packs,
            "tokens": tokens,
            "mtokens_per_s": tokens as f64 / seconds / 1e6,
            "utilization": report.utilization,
            "peak_rss_mib": peak_rss_mib(),
            "checksum": checksum,
        })
    );
    Ok(())
}
