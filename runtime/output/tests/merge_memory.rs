//! `merge_outputs` in bounded memory: merging 3 parts of 3× more rows barely moves the peak
//! resident set, far less than the embeddings it copies (a merge that held them would grow by
//! their size). The first merge pays a fixed ~40 MiB (HDF5's free lists and chunk buffers, which
//! fill up to their caps over the first ~100k rows: from 30k to 120k rows the peak still grows
//! by 28 MiB, from 120k to 360k by 8 MiB). Alone in its own test binary so no other test's
//! allocations pollute the peak.

mod common;

use std::path::{Path, PathBuf};

use virnuc_core::SequenceMeta;
use virnuc_output::{EmbeddingWriter, OutputConfig, OutputDtype, merge_outputs, synthetic};

const H: usize = 64;

/// Part `i` of 3 of an input of `records` records, one sequence each.
fn part(dir: &Path, tag: &str, records: u64, i: u64) -> PathBuf {
    let path = dir.join(format!("{tag}-{i}.h5"));
    let config = OutputConfig {
        path: path.clone(),
        hidden_size: H,
        per_token: false,
        dtype: OutputDtype::F32,
        attributes: vec![("input_shard".into(), format!("{i}/3"))],
        resume: false,
        shard_sequences: 1000,
    };
    let mut writer = EmbeddingWriter::open(config).expect("opens");
    let mine: Vec<u64> = (0..records).filter(|r| r % 3 == i).collect();
    for (c, chunk) in mine.chunks(256).enumerate() {
        let metas: Vec<SequenceMeta> = chunk
            .iter()
            .enumerate()
            .map(|(k, &r)| SequenceMeta {
                index: (c * 256 + k) as u64,
                record: r,
                id: synthetic::id(r),
                residues: 1,
            })
            .collect();
        let mean: Vec<f32> = chunk
            .iter()
            .flat_map(|&r| (0..H as u64).map(move |k| synthetic::value(r, 0, k)))
            .collect();
        writer.write_pack(&metas, &mean, None).expect("pack");
    }
    writer.finish(mine.len() as u64).expect("finishes");
    path
}

#[test]
fn merging_3x_more_rows_stays_in_the_same_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (small_n, big_n) = (120_000u64, 360_000u64);
    let small: Vec<PathBuf> = (0..3)
        .map(|i| part(dir.path(), "small", small_n, i))
        .collect();
    let big: Vec<PathBuf> = (0..3).map(|i| part(dir.path(), "big", big_n, i)).collect();
    let before = common::peak_rss();
    merge_outputs(&small, &dir.path().join("small.h5"), 1024).expect("merges");
    let after_small = common::peak_rss();
    merge_outputs(&big, &dir.path().join("big.h5"), 1024).expect("merges");
    let after_big = common::peak_rss();
    let embeddings = big_n * H as u64 * 4;
    let growth = after_big.saturating_sub(after_small);
    eprintln!(
        "peak: {before} before, +{} small merge, +{growth} big merge; big embeddings {embeddings} bytes",
        after_small.saturating_sub(before)
    );
    assert!(
        growth < embeddings / 4,
        "the merge's peak grew by {growth} bytes with 3x the rows ({embeddings} bytes of embeddings)"
    );
}
