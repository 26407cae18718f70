#![allow(dead_code, clippy::unwrap_used)]
//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use virnuc_core::PackedBatch;
use virnuc_data::{PipelineConfig, RunReport};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The lambda genome sequence (48,502 bp), from the fixture.
pub fn lambda_seq() -> Vec<u8> {
    let text = std::fs::read_to_string(fixture("lambda_virus.fa")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('>'))
        .flat_map(|l| l.trim().bytes())
        .collect()
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs the pipeline to the end; panics on error.
pub fn run(config: PipelineConfig) -> (Vec<PackedBatch>, RunReport) {
    let mut pipeline = virnuc_data::start(config).unwrap();
    let packs: Vec<PackedBatch> = pipeline.by_ref().map(|p| p.unwrap()).collect();
    let report = pipeline.finish().unwrap();
    report.check_accounting().unwrap();
    (packs, report)
}

/// (index, id, residue tokens) of every packed sequence, sorted by index.
pub fn sequences(packs: &[PackedBatch]) -> Vec<(u64, String, Vec<i64>)> {
    let mut out = vec![];
    for p in packs {
        for (i, s) in p.sequences.iter().enumerate() {
            let r = p.token_range(i);
            out.push((
                s.index,
                s.id.clone(),
                p.input_ids[r.start + 1..r.end - 1].to_vec(),
            ));
        }
    }
    out.sort_by_key(|s| s.0);
    out
}

pub fn config(inputs: Vec<PathBuf>) -> PipelineConfig {
    PipelineConfig {
        inputs,
        ..PipelineConfig::default()
    }
}
