//! `merge_outputs`: the parts of an `--input-shard I/N` split join into the file a single run over
//! the whole input writes, byte for byte; every way a set of parts can be wrong is refused and
//! leaves no output behind.

use std::path::{Path, PathBuf};

use virnuc_core::SequenceMeta;
use virnuc_output::{
    EmbeddingWriter, OutputConfig, OutputDtype, OutputError, merge_outputs, synthetic,
};

const H: usize = 8;
/// Input records of the synthetic input.
const RECORDS: u64 = 240;

/// Sequences of input record `r`: 0 to 3 (0: an empty record, or all frames with a stop codon).
fn sequences_of(r: u64) -> u64 {
    synthetic::splitmix64(r ^ 0xC0FFEE) % 4
}

/// The rows a run over the records `keep` writes, in its output order: (record, sequence of it).
fn rows(keep: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    (0..RECORDS)
        .filter(|&r| keep(r))
        .flat_map(|r| (0..sequences_of(r)).map(move |j| (r, j)))
        .collect()
}

/// Values depend on the sequence (record, j), never on where it lands in a file: as a model's.
fn key(r: u64, j: u64) -> u64 {
    r * 4 + j
}

fn attributes(shard: &str, precision: &str) -> Vec<(String, String)> {
    vec![
        ("model_name".into(), "synthetic".into()),
        ("precision".into(), precision.into()),
        ("token_budget".into(), "2048".into()),
        ("input_shard".into(), shard.into()),
        ("random_weights".into(), "true".into()),
    ]
}

/// Writes one run's output: `rows` in packs of up to 5, arriving in reverse order.
fn write(
    path: &Path,
    rows: &[(u64, u64)],
    attributes: Vec<(String, String)>,
    dtype: OutputDtype,
    per_token: bool,
) {
    let config = OutputConfig {
        path: path.to_path_buf(),
        hidden_size: H,
        per_token,
        dtype,
        attributes,
        resume: false,
        shard_sequences: 7,
    };
    let mut writer = EmbeddingWriter::open(config).expect("opens");
    let indexed: Vec<(u64, (u64, u64))> = rows
        .iter()
        .copied()
        .enumerate()
        .map(|(i, x)| (i as u64, x))
        .collect();
    for pack in indexed.chunks(5).rev() {
        let mut metas = Vec::new();
        let mut mean = Vec::new();
        let mut states = Vec::new();
        let mut cu = vec![0i32];
        for &(index, (r, j)) in pack {
            let k = key(r, j);
            let residues = synthetic::residues(k);
            metas.push(SequenceMeta {
                index,
                record: r,
                id: synthetic::id(k),
                residues,
            });
            mean.extend((0..H as u64).map(|c| synthetic::value(k, 0, c)));
            states.extend(std::iter::repeat_n(99.0f32, H));
            for t in 0..u64::from(residues) {
                states.extend((0..H as u64).map(|c| synthetic::value(k, t + 1, c)));
            }
            states.extend(std::iter::repeat_n(-99.0f32, H));
            cu.push(cu[cu.len() - 1] + residues as i32 + 2);
        }
        writer
            .write_pack(&metas, &mean, Some((&states, &cu)))
            .expect("pack");
    }
    writer.finish(rows.len() as u64).expect("finishes");
}

struct Split {
    _dir: tempfile::TempDir,
    root: PathBuf,
    whole: PathBuf,
    parts: Vec<PathBuf>,
}

fn split(n: u64, dtype: OutputDtype, per_token: bool) -> Split {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let precision = format!("{dtype:?}").to_lowercase();
    let whole = root.join("whole.h5");
    write(
        &whole,
        &rows(|_| true),
        attributes("all", &precision),
        dtype,
        per_token,
    );
    let parts = (0..n)
        .map(|i| {
            let p = root.join(format!("part{i}.h5"));
            write(
                &p,
                &rows(|r| r % n == i),
                attributes(&format!("{i}/{n}"), &precision),
                dtype,
                per_token,
            );
            p
        })
        .collect();
    Split {
        _dir: dir,
        root,
        whole,
        parts,
    }
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("readable")
}

#[test]
fn three_parts_merge_into_the_whole_runs_file_byte_for_byte() {
    for (dtype, per_token) in [
        (OutputDtype::F32, true),
        (OutputDtype::F16, false),
        (OutputDtype::F16, true),
    ] {
        let s = split(3, dtype, per_token);
        // Given in any order; blocks of 3 rows force many refills of every part's buffers.
        let parts = vec![s.parts[2].clone(), s.parts[0].clone(), s.parts[1].clone()];
        for block in [3, 1024] {
            let out = s.root.join(format!("merged-{block}.h5"));
            let summary = merge_outputs(&parts, &out, block).expect("merges");
            assert_eq!(summary.sequences, rows(|_| true).len() as u64);
            assert_eq!(summary.parts, 3);
            assert!(
                bytes(&out) == bytes(&s.whole),
                "{dtype:?} per-token {per_token} block {block}: merged file differs from the whole run"
            );
        }
        // The parts really are different orders of the rows (the merge had work to do).
        assert!(bytes(&s.parts[0]) != bytes(&s.whole));
    }
}

#[test]
fn one_shard_of_one_merges_to_itself_with_input_shard_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let whole = dir.path().join("whole.h5");
    let part = dir.path().join("part.h5");
    write(
        &whole,
        &rows(|_| true),
        attributes("all", "f32"),
        OutputDtype::F32,
        false,
    );
    write(
        &part,
        &rows(|_| true),
        attributes("0/1", "f32"),
        OutputDtype::F32,
        false,
    );
    let out = dir.path().join("m.h5");
    merge_outputs(&[part], &out, 16).expect("merges");
    assert!(bytes(&out) == bytes(&whole));
}

/// Runs a merge that must fail; checks that no output (nor temp file) is left.
fn refused(parts: &[PathBuf], root: &Path) -> OutputError {
    let out = root.join("refused.h5");
    let err = merge_outputs(parts, &out, 64).expect_err("refused");
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("merge"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    err
}

#[test]
fn a_missing_or_duplicated_shard_is_refused() {
    let s = split(3, OutputDtype::F32, false);
    let err = refused(&s.parts[..2], &s.root);
    assert!(
        matches!(
            err,
            OutputError::ShardsMissing {
                missing: 1,
                count: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2/3"), "{err}");

    let copy = s.root.join("copy-of-part1.h5");
    std::fs::copy(&s.parts[1], &copy).expect("copy");
    let err = refused(
        &[
            s.parts[0].clone(),
            s.parts[1].clone(),
            copy,
            s.parts[2].clone(),
        ],
        &s.root,
    );
    assert!(matches!(err, OutputError::ShardTwice { .. }), "{err}");
    assert!(
        err.to_string().contains("1/3") && err.to_string().contains("copy-of-part1"),
        "{err}"
    );
}

#[test]
fn parts_of_different_runs_or_splits_are_refused() {
    let s = split(3, OutputDtype::F32, false);
    // Another setting (here the output precision attribute) in one part.
    let other = s.root.join("other.h5");
    write(
        &other,
        &rows(|r| r % 3 == 1),
        attributes("1/3", "fp16-elsewhere"),
        OutputDtype::F32,
        false,
    );
    let err = refused(&[s.parts[0].clone(), other, s.parts[2].clone()], &s.root);
    assert!(matches!(err, OutputError::PartsDiffer { .. }), "{err}");
    assert!(err.to_string().contains("attribute precision"), "{err}");

    // Another layout (float16 rows).
    let f16 = s.root.join("f16.h5");
    write(
        &f16,
        &rows(|r| r % 3 == 1),
        attributes("1/3", "f32"),
        OutputDtype::F16,
        false,
    );
    let err = refused(&[s.parts[0].clone(), f16, s.parts[2].clone()], &s.root);
    assert!(err.to_string().contains("layout"), "{err}");

    // A shard of another split.
    let half = s.root.join("half.h5");
    write(
        &half,
        &rows(|r| r % 2 == 1),
        attributes("1/2", "f32"),
        OutputDtype::F32,
        false,
    );
    let err = refused(&[s.parts[0].clone(), half, s.parts[2].clone()], &s.root);
    assert!(err.to_string().contains("shard count"), "{err}");

    // A whole run is not a part.
    let err = refused(&[s.whole.clone(), s.parts[1].clone()], &s.root);
    assert!(matches!(err, OutputError::NotAPart { .. }), "{err}");
    assert!(err.to_string().contains("\"all\""), "{err}");

    // Not an HDF5 file at all.
    let text = s.root.join("notes.h5");
    std::fs::write(&text, "not hdf5").expect("write");
    let err = refused(&[text], &s.root);
    assert!(matches!(err, OutputError::NotAnOutput { .. }), "{err}");
}

#[test]
fn a_mislabelled_part_is_caught_while_merging() {
    let s = split(3, OutputDtype::F32, false);
    // Says 1/3 but holds shard 0's records: the first row already belongs to another shard.
    let liar = s.root.join("liar.h5");
    write(
        &liar,
        &rows(|r| r % 3 == 0),
        attributes("1/3", "f32"),
        OutputDtype::F32,
        false,
    );
    let err = refused(&[s.parts[0].clone(), liar, s.parts[2].clone()], &s.root);
    assert!(matches!(err, OutputError::PartOrder { .. }), "{err}");
    assert!(err.to_string().contains("not in shard 1/3"), "{err}");
}

#[test]
fn an_existing_output_is_never_overwritten() {
    let s = split(3, OutputDtype::F32, false);
    let out = s.root.join("exists.h5");
    std::fs::write(&out, "keep me").expect("write");
    let err = merge_outputs(&s.parts, &out, 64).expect_err("refused");
    assert!(matches!(err, OutputError::Exists { .. }), "{err}");
    assert_eq!(bytes(&out), b"keep me");
    let err = merge_outputs(&s.parts, &s.root.join("x.h5"), 0).expect_err("block 0");
    assert!(matches!(err, OutputError::InvalidConfig { .. }), "{err}");
}
