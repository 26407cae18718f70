//! The writer end to end on CPU: determinism, h5py compatibility, dtypes, per-token states, the
//! checks at `finish`, refusals, and resume with damaged working files.

mod common;

use std::path::{Path, PathBuf};

use common::{config, h5py_check, h5py_check_result, write_file, write_packs};
use virnuc_core::SequenceMeta;
use virnuc_output::{EmbeddingWriter, OutputDtype, OutputError, synthetic};

const H: usize = 16;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("output readable")
}

fn partial(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", path.display()))
}

#[test]
fn runs_with_different_shards_and_pack_orders_give_byte_identical_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 3000;
    let a = dir.path().join("a.h5");
    let b = dir.path().join("b.h5");
    let c = dir.path().join("c.h5");
    write_file(config(&a, H, OutputDtype::F32, true), n, 1, 24);
    let mut cb = config(&b, H, OutputDtype::F32, true);
    cb.shard_sequences = 37;
    write_file(cb, n, 2, 3);
    write_file(config(&c, H, OutputDtype::F32, true), n, 1, 24);
    assert!(
        read(&a) == read(&b),
        "different shards/order changed the bytes"
    );
    assert!(read(&a) == read(&c), "the same run twice changed the bytes");
    assert!(!partial(&a).exists(), "working files removed after finish");
    h5py_check(&a, n, H, OutputDtype::F32, true);
}

/// Why `obj_track_times(false)` matters: with HDF5's default, two files with the same content
/// written a second apart differ. (So the byte-identity check above can fail.)
#[test]
fn object_time_tracking_would_break_byte_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let make = |name: &str, track: bool| {
        let path = dir.path().join(name);
        let file = hdf5::File::with_options()
            .with_fcpl(|p| p.obj_track_times(track))
            .create(&path)
            .expect("create");
        file.new_dataset::<f32>()
            .obj_track_times(track)
            .shape([4])
            .create("x")
            .expect("dataset")
            .write(&[1.0f32, 2.0, 3.0, 4.0][..])
            .expect("write");
        file.close().expect("close");
        read(&path)
    };
    let tracked_1 = make("t1.h5", true);
    let untracked_1 = make("u1.h5", false);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let tracked_2 = make("t2.h5", true);
    let untracked_2 = make("u2.h5", false);
    assert!(
        tracked_1 != tracked_2,
        "time tracking should stamp the file"
    );
    assert!(untracked_1 == untracked_2);
}

#[test]
fn h5py_check_fails_on_a_single_wrong_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.h5");
    let n = 300;
    write_file(config(&path, H, OutputDtype::F32, true), n, 1, 8);
    h5py_check(&path, n, H, OutputDtype::F32, true);
    {
        let file = hdf5::File::open_rw(&path).expect("open rw");
        let states = file.dataset("token_states").expect("token_states");
        states
            .write_slice(&[0.5f32][..], (7..8, 3))
            .expect("overwrite one value");
    }
    let err = h5py_check_result(&path, n, H, OutputDtype::F32, true).expect_err("check fails");
    assert!(err.contains("token_states"), "{err}");
    // And a wrong declared dtype or per-token mode fails too.
    assert!(h5py_check_result(&path, n, H, OutputDtype::F16, true).is_err());
}

#[test]
fn fp16_output_holds_the_rounded_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("half.h5");
    let n = 1000;
    write_file(config(&path, H, OutputDtype::F16, true), n, 3, 16);
    h5py_check(&path, n, H, OutputDtype::F16, true);
    let file = hdf5::File::open(&path).expect("open");
    let emb = file
        .dataset("embeddings")
        .expect("embeddings")
        .read_2d::<half::f16>()
        .expect("f16 embeddings");
    assert_eq!(emb.shape(), &[n as usize, H]);
    for i in [0u64, 1, 517, 999] {
        for k in 0..H {
            let want = half::f16::from_f32(synthetic::value(i, 0, k as u64));
            assert_eq!(emb[[i as usize, k]], want, "row {i} col {k}");
        }
    }
    // Stored as 2-byte floats (not f32 converted on read): half the storage of the f32 file.
    let f32_path = dir.path().join("full.h5");
    write_file(config(&f32_path, H, OutputDtype::F32, true), n, 3, 16);
    let full = hdf5::File::open(&f32_path).expect("open");
    for name in ["embeddings", "token_states"] {
        let ds = file.dataset(name).expect("dataset");
        assert_eq!(ds.dtype().expect("dtype").size(), 2, "{name}");
    }
    let half_size = file.dataset("embeddings").expect("dataset").storage_size();
    let full_size = full.dataset("embeddings").expect("dataset").storage_size();
    assert_eq!(2 * half_size, full_size);
}

#[test]
fn per_token_states_round_trip_without_cls_and_eos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tok.h5");
    let n = 500;
    write_file(config(&path, H, OutputDtype::F32, true), n, 4, 12);
    let file = hdf5::File::open(&path).expect("open");
    let offsets = file
        .dataset("token_offsets")
        .expect("offsets")
        .read_1d::<u64>()
        .expect("u64");
    let lengths = file
        .dataset("lengths")
        .expect("lengths")
        .read_1d::<u32>()
        .expect("u32");
    let states = file
        .dataset("token_states")
        .expect("states")
        .read_2d::<f32>()
        .expect("f32");
    assert_eq!(offsets.len(), n as usize + 1);
    assert_eq!(offsets[n as usize] as usize, states.shape()[0]);
    for i in 0..n {
        let (a, b) = (offsets[i as usize], offsets[i as usize + 1]);
        assert_eq!(b - a, u64::from(lengths[i as usize]));
        assert_eq!(lengths[i as usize], synthetic::residues(i));
        for t in 0..(b - a) {
            for k in 0..H {
                assert_eq!(
                    states[[(a + t) as usize, k]],
                    synthetic::value(i, t + 1, k as u64)
                );
            }
        }
    }
    // The synthetic <cls>/<eos> rows are ±99; none may survive.
    assert!(states.iter().all(|v| v.abs() <= 1.0));
}

#[test]
fn mean_only_output_has_no_token_datasets_and_empty_output_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mean.h5");
    write_file(config(&path, H, OutputDtype::F32, false), 400, 5, 10);
    h5py_check(&path, 400, H, OutputDtype::F32, false);
    let empty = dir.path().join("empty.h5");
    let writer = EmbeddingWriter::open(config(&empty, H, OutputDtype::F32, true)).expect("opens");
    writer
        .finish(0)
        .expect("an empty input gives an empty file");
    h5py_check(&empty, 0, H, OutputDtype::F32, true);
}

#[test]
fn refuses_existing_output_leftovers_and_unwritable_places() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.h5");
    std::fs::write(&path, b"precious").expect("write");
    let err =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, false)).expect_err("refused");
    assert!(matches!(err, OutputError::Exists { .. }));
    let message = err.to_string();
    assert!(
        message.contains("out.h5") && message.contains("--resume"),
        "{message}"
    );
    assert_eq!(read(&path), b"precious", "existing output untouched");

    let mut resume = config(&path, H, OutputDtype::F32, false);
    resume.resume = true;
    let err = EmbeddingWriter::open(resume).expect_err("not ours");
    assert!(matches!(err, OutputError::NotAnOutput { .. }), "{err}");
    assert_eq!(read(&path), b"precious");

    let other = dir.path().join("other.h5");
    let mut writer =
        EmbeddingWriter::open(config(&other, H, OutputDtype::F32, false)).expect("opens");
    write_packs(&mut writer, &[vec![0, 1, 2]], H);
    writer.flush().expect("flush");
    let mut second = config(&other, H, OutputDtype::F32, false);
    second.resume = true;
    let err = EmbeddingWriter::open(second).expect_err("a live writer holds the lock");
    assert!(matches!(err, OutputError::Locked { .. }), "{err}");
    drop(writer);
    let err = EmbeddingWriter::open(config(&other, H, OutputDtype::F32, false))
        .expect_err("leftovers refused");
    assert!(matches!(err, OutputError::PartialExists { .. }), "{err}");
    assert!(err.to_string().contains("--resume"), "{err}");
    assert!(!other.exists(), "nothing at the output path");

    let a_file = dir.path().join("file");
    std::fs::write(&a_file, b"").expect("write");
    for bad in [
        a_file.join("out.h5"),
        dir.path().join("missing/out.h5"),
        PathBuf::from("/proc/virnuc-output-test.h5"),
    ] {
        let err = EmbeddingWriter::open(config(&bad, H, OutputDtype::F32, false))
            .expect_err("unwritable refused");
        assert!(
            matches!(err, OutputError::Unwritable { .. }),
            "{bad:?}: {err}"
        );
        assert!(!bad.exists());
    }
}

#[test]
fn resume_with_different_settings_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.h5");
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, true)).expect("opens");
    write_packs(&mut writer, &[vec![0, 1, 2]], H);
    writer.flush().expect("flush");
    drop(writer);
    let resume = |change: &dyn Fn(&mut virnuc_output::OutputConfig)| {
        let mut c = config(&path, H, OutputDtype::F32, true);
        c.resume = true;
        change(&mut c);
        EmbeddingWriter::open(c)
    };
    type Change<'a> = &'a dyn Fn(&mut virnuc_output::OutputConfig);
    let cases: [(Change, &str); 4] = [
        (&|c| c.hidden_size = 32, "hidden size"),
        (&|c| c.dtype = OutputDtype::F16, "dtype"),
        (&|c| c.per_token = false, "per-token"),
        (&|c| c.attributes[2].1 = "cuda".into(), "execution_provider"),
    ];
    for (change, what) in cases {
        let err = resume(change).expect_err("mismatch refused");
        assert!(matches!(err, OutputError::ResumeMismatch { .. }), "{err}");
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // Shard size is not part of the fingerprint: it does not change the output.
    let mut ok = resume(&|c| c.shard_sequences = 7).expect("same settings resume");
    assert!(ok.done()(1));
    write_packs(&mut ok, &synthetic::ffd_order(50, 256, 5, 1), H);
    ok.finish(50).expect("finishes");
    h5py_check(&path, 50, H, OutputDtype::F32, true);
}

#[test]
fn finish_names_the_missing_or_stray_index_and_leaves_no_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.h5");
    // A gap: everything but index 17.
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, true)).expect("opens");
    let all: Vec<u64> = (0..100).filter(|&i| i != 17).collect();
    write_packs(&mut writer, &[all], H);
    let err = writer.finish(100).expect_err("gap detected");
    assert!(
        matches!(
            err,
            OutputError::Missing {
                index: 17,
                missing: 1,
                expected: 100
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("17"), "{err}");
    assert!(!path.exists(), "no output after a failed finish");

    // The work was kept: resume, add the missing one, finish.
    let mut c = config(&path, H, OutputDtype::F32, true);
    c.resume = true;
    let mut writer = EmbeddingWriter::open(c.clone()).expect("resumes");
    assert_eq!(writer.resume_info().sequences_done, 99);
    // Fewer expected than written: the stray index is named.
    write_packs(&mut writer, &[vec![17]], H);
    let err = writer.finish(90).expect_err("out of range");
    assert!(
        matches!(
            err,
            OutputError::OutOfRange {
                index: 99,
                expected: 90
            }
        ),
        "{err}"
    );
    // More expected than written: the first missing index is named.
    let writer = EmbeddingWriter::open(c.clone()).expect("resumes");
    let err = writer.finish(105).expect_err("tail missing");
    assert!(
        matches!(
            err,
            OutputError::Missing {
                index: 100,
                missing: 5,
                ..
            }
        ),
        "{err}"
    );
    let writer = EmbeddingWriter::open(c).expect("resumes");
    writer.finish(100).expect("complete now");
    h5py_check(&path, 100, H, OutputDtype::F32, true);
}

#[test]
fn a_duplicate_is_refused_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.h5");
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, true)).expect("opens");
    write_packs(&mut writer, &[vec![0, 1, 2, 3]], H);
    let (metas, mean, states, cu) = synthetic::pack(&[5, 2], H);
    let err = writer
        .write_pack(&metas, &mean, Some((&states, &cu)))
        .expect_err("duplicate");
    assert!(
        matches!(err, OutputError::Duplicate { index: 2, .. }),
        "{err}"
    );
    writer.flush().expect("flush");
    drop(writer);

    // A working directory where two journaled shards hold index 0..3 (a copied shard).
    let work = partial(&path);
    let journal = work.join("journal");
    let text = std::fs::read_to_string(&journal).expect("journal");
    let line = text.lines().nth(1).expect("one shard").to_string();
    let name = line.split(' ').next().expect("name").to_string();
    std::fs::copy(work.join(&name), work.join("shard-00000042.bin")).expect("copy");
    let body = line
        .rsplit_once(" check=")
        .expect("check field")
        .0
        .replace(&name, "shard-00000042.bin");
    let check = crc32fast::hash(body.as_bytes());
    std::fs::write(&journal, format!("{text}{body} check={check:08x}\n")).expect("journal");
    let mut c = config(&path, H, OutputDtype::F32, true);
    c.resume = true;
    let err = EmbeddingWriter::open(c).expect_err("duplicate on disk");
    assert!(matches!(err, OutputError::CorruptShard { .. }), "{err}");
    assert!(err.to_string().contains("index 0"), "{err}");
}

#[test]
fn resume_discards_corrupt_torn_and_unjournaled_shards_and_still_matches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 2000;
    let reference = dir.path().join("ref.h5");
    write_file(config(&reference, H, OutputDtype::F32, true), n, 6, 16);

    let path = dir.path().join("out.h5");
    let packs = synthetic::ffd_order(n, 256, 16, 6);
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, true)).expect("opens");
    write_packs(&mut writer, &packs[..packs.len() / 2], H);
    drop(writer); // As a kill: buffered sequences are lost, shards stay.

    let work = partial(&path);
    let journal = work.join("journal");
    let text = std::fs::read_to_string(&journal).expect("journal");
    let shards: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split(' ').next().expect("name").to_string())
        .collect();
    assert!(shards.len() >= 4, "{} shards", shards.len());
    // 1: a payload byte flipped in a journaled shard.
    let victim = work.join(&shards[1]);
    let mut bytes = std::fs::read(&victim).expect("shard");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, bytes).expect("write");
    // 2: the last journal line torn (its shard was renamed but the append did not finish).
    let last = text.trim_end().rsplit_once('\n').expect("lines").0.len() + 1;
    std::fs::write(&journal, &text[..text.len() - 7]).expect("tear");
    let torn_shard = text[last..].split(' ').next().expect("name").to_string();
    // 3: an unjournaled shard and a temp file, as a kill mid-flush leaves them.
    std::fs::write(work.join("shard-09999999.bin"), b"half a shard").expect("write");
    std::fs::write(work.join("shard-10000000.bin.tmp"), b"half").expect("write");

    let mut c = config(&path, H, OutputDtype::F32, true);
    c.resume = true;
    let mut writer = EmbeddingWriter::open(c).expect("resumes");
    let info = writer.resume_info().clone();
    let discarded: Vec<String> = info
        .discarded
        .iter()
        .map(|(p, why)| format!("{} {why}", p.display()))
        .collect();
    assert!(
        discarded
            .iter()
            .any(|d| d.contains(&shards[1]) && d.contains("checksum")),
        "{discarded:?}"
    );
    assert!(
        discarded.iter().any(|d| d.contains(&torn_shard)),
        "{discarded:?}"
    );
    assert!(
        discarded.iter().any(|d| d.contains("shard-09999999")),
        "{discarded:?}"
    );
    assert_eq!(info.shards_kept, shards.len() - 2);
    assert!(!work.join("shard-10000000.bin.tmp").exists());
    // Sequences of the corrupt shard are not reported done: they will be recomputed.
    let done = writer.done();
    let recomputed = (0..n).filter(|&i| !done(i)).count() as u64;
    assert_eq!(recomputed, n - info.sequences_done);
    write_packs(&mut writer, &packs, H);
    writer.finish(n).expect("finishes");
    assert!(read(&path) == read(&reference), "resumed output differs");
}

#[test]
fn malformed_packs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.h5");
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, true)).expect("opens");
    let (metas, mean, states, cu) = synthetic::pack(&[0, 1], H);
    let err = writer
        .write_pack(&metas, &mean[..H], Some((&states, &cu)))
        .expect_err("short mean");
    assert!(err.to_string().contains("mean values"), "{err}");
    let err = writer
        .write_pack(&metas, &mean, None)
        .expect_err("no states");
    assert!(err.to_string().contains("token states"), "{err}");
    let mut bad_cu = cu.clone();
    bad_cu[1] += 1;
    let err = writer
        .write_pack(&metas, &mean, Some((&states, &bad_cu)))
        .expect_err("cu mismatch");
    assert!(err.to_string().contains("residues"), "{err}");
    let nul = [SequenceMeta {
        index: 0,
        record: 0,
        id: "a\0b".into(),
        residues: metas[0].residues,
    }];
    let err = writer
        .write_pack(
            &nul,
            &mean[..H],
            Some((&states[..cu[1] as usize * H], &cu[..2])),
        )
        .expect_err("NUL id");
    assert!(
        matches!(err, OutputError::InvalidId { index: 0, .. }),
        "{err}"
    );
    // Nothing of the refused packs was recorded.
    writer
        .write_pack(&metas, &mean, Some((&states, &cu)))
        .expect("the good pack still goes in");
    writer.finish(2).expect("finishes");
}

/// `--resume` on a finished file: "nothing to resume" only when it is this run's output; a file made
/// with other settings is named as such, with the first attribute that differs.
#[test]
fn resume_of_a_complete_output_checks_it_is_the_same_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("done.h5");
    let mut writer =
        EmbeddingWriter::open(config(&path, H, OutputDtype::F32, false)).expect("opens");
    write_packs(&mut writer, &[vec![0, 1], vec![2]], H);
    writer.finish(3).expect("finishes");

    let mut same = config(&path, H, OutputDtype::F32, false);
    same.resume = true;
    let err = EmbeddingWriter::open(same.clone()).expect_err("complete");
    assert!(matches!(err, OutputError::AlreadyComplete { .. }), "{err}");

    let mut other = same.clone();
    other.attributes[1].1 = "fp16".into();
    let err = EmbeddingWriter::open(other).expect_err("another run's file");
    match &err {
        OutputError::CompleteButDifferent {
            key,
            existing,
            requested,
            ..
        } => {
            assert_eq!(
                (key.as_str(), existing.as_str(), requested.as_str()),
                ("precision", "f32", "fp16")
            );
        }
        e => panic!("expected CompleteButDifferent, got {e}"),
    }
    let mut extra = same;
    extra.attributes.push(("input_shard".into(), "1/4".into()));
    let err = EmbeddingWriter::open(extra).expect_err("attribute missing from the file");
    assert!(
        err.to_string().contains("input_shard = \"(missing)\""),
        "{err}"
    );
    assert!(path.exists(), "the finished file is never touched");
}
