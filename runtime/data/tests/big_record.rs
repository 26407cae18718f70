#![allow(clippy::unwrap_used)]
//! A 10 Mbp single record streams through in bounded memory (own test binary, so the peak RSS
//! measured is this test's alone).

mod common;

use std::io::Write;

use common::*;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_mbp_single_record() {
    let dir = tempfile::tempdir().unwrap();
    let lambda = lambda_seq();
    let path = dir.path().join("big.fa");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(f, ">big one record").unwrap();
    let target = 10_000_000;
    let mut written = 0;
    while written < target {
        let n = (target - written).min(lambda.len());
        for line in lambda[..n].chunks(80) {
            f.write_all(line).unwrap();
            f.write_all(b"\n").unwrap();
        }
        written += n;
    }
    drop(f);
    let mut pipeline = virnuc_data::start(config(vec![path])).unwrap();
    let mut tokens = 0;
    for p in pipeline.by_ref() {
        tokens += p.unwrap().num_tokens();
    }
    let report = pipeline.finish().unwrap();
    report.check_accounting().unwrap();
    assert_eq!(report.files[0].residues, 10_000_000);
    assert_eq!(report.stages.chunks, 20_000);
    assert_eq!(report.packing.tokens as usize, tokens);
    // The record itself (10 MB) is held once by needletail and once in the reader batch; everything
    // downstream is windowed. Debug builds and the test harness included, stay well under 256 MB.
    let rss = peak_rss_kib();
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
    eprintln!(
        "peak RSS {} MiB, {} packs",
        rss / 1024,
        report.packing.packs
    );
}
