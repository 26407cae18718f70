//! Bounded memory: 200k sequences × H = 64 in shards of 1000 (200 shards, so the merge needs an
//! intermediate pass at fan-in 64). The peak resident set must not depend on the number of
//! sequences (a 4× larger run after a small one barely moves it) and stays far below the size of
//! the embeddings: the writer never holds them all.
//!
//! Alone in its own test binary so no other test's allocations pollute the peak.

mod common;

use std::path::Path;

use virnuc_output::{EmbeddingWriter, OutputDtype, synthetic};

const N: u64 = 200_000;
const H: usize = 64;

fn write(path: &Path, n: u64) -> usize {
    let mut config = common::config(path, H, OutputDtype::F32, false);
    config.shard_sequences = 1000;
    let packs = synthetic::ffd_order(n, 512, 64, 21);
    let mut writer = EmbeddingWriter::open(config).expect("opens");
    for pack in &packs {
        let metas: Vec<_> = pack.iter().map(|&i| synthetic::meta(i)).collect();
        let mean: Vec<f32> = pack
            .iter()
            .flat_map(|&i| (0..H as u64).map(move |k| synthetic::value(i, 0, k)))
            .collect();
        writer.write_pack(&metas, &mean, None).expect("pack");
    }
    writer.finish(n).expect("finishes").shards
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

#[test]
fn writing_and_merging_200k_sequences_stays_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let baseline = common::peak_rss();
    // A quarter-size run first: whatever fixed buffers and caches exist reach their size here.
    let small = dir.path().join("small.h5");
    assert_eq!(write(&small, N / 4), 50);
    let growth_small = common::peak_rss() - baseline;
    let path = dir.path().join("big.h5");
    assert_eq!(write(&path, N), 200);
    let growth = common::peak_rss() - baseline;

    // What holding everything would take: the f32 embeddings alone (ids and lengths on top).
    let all_embeddings = N * H as u64 * 4;
    eprintln!(
        "peak RSS growth: {:.1} MiB after {}k sequences, {:.1} MiB after {}k (all embeddings: {:.1} MiB)",
        mib(growth_small),
        N / 4000,
        mib(growth),
        N / 1000,
        mib(all_embeddings)
    );
    // Memory proportional to N would add ~3/4 of the embeddings (37 MiB) for the 4× larger run.
    let per_n_bound: u64 = 6 << 20;
    assert!(
        growth - growth_small < per_n_bound,
        "4× more sequences raised the peak by {:.1} MiB",
        mib(growth - growth_small)
    );
    // Fixed cost: one pending shard (1000 × ~300 B), 64 merge readers × 64 KiB, ~512 KiB row buffers
    // per dataset, HDF5 chunk buffers and free lists (capped at 16 MiB), a 4 MiB metadata cache.
    let fixed_bound: u64 = 24 << 20;
    assert!(
        growth < fixed_bound,
        "peak RSS grew by {:.1} MiB",
        mib(growth)
    );

    // The measurement can fail: holding the embeddings does move the peak by their size.
    let before = common::peak_rss();
    let held: Vec<f32> = (0..N * H as u64).map(|k| k as f32).collect();
    std::hint::black_box(&held);
    assert!(common::peak_rss() - before > per_n_bound.max(all_embeddings / 2));
    drop(held);

    common::h5py_check(&path, N, H, OutputDtype::F32, false);
}
