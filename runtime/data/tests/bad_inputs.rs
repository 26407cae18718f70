#![allow(clippy::unwrap_used)]
//! Bad inputs: each either a clear error naming file and record, or a documented skip the report counts.

mod common;

use std::io::Write;

use common::*;
use virnuc_data::{DataError, PipelineConfig, RunReport};

/// Runs to the end and returns the error (with the report) the run ended with.
fn run_err(config: PipelineConfig) -> (usize, String, RunReport) {
    let mut pipeline = virnuc_data::start(config).unwrap();
    let mut packs = 0;
    let mut error = None;
    for item in pipeline.by_ref() {
        match item {
            Ok(_) => packs += 1,
            Err(e) => error = Some(e.to_string()),
        }
    }
    let error = error.expect("the iterator yields the error");
    match pipeline.finish() {
        Err(DataError::RunFailed { first, report }) => {
            assert_eq!(first, error);
            (packs, error, *report)
        }
        other => panic!("expected RunFailed, got {other:?}"),
    }
}

#[test]
fn empty_file_is_counted_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.fa", b"");
    let (packs, report) = run(config(vec![empty, fixture("lambda_virus.fa")]));
    assert!(!packs.is_empty());
    assert!(report.files[0].empty);
    assert_eq!(report.files[0].records, 0);
    assert!(!report.files[1].empty);
}

#[test]
fn record_without_sequence_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "e.fa",
        b">empty\n>next desc\nATGGCCAAA\n>last\n",
    );
    let (packs, report) = run(config(vec![f]));
    assert_eq!(report.records_read, 3);
    assert_eq!(report.records_empty, 2);
    assert_eq!(report.stages.records_processed, 1);
    assert!(
        sequences(&packs)
            .iter()
            .all(|s| s.1.starts_with("next_chunk_1"))
    );
}

#[test]
fn binary_garbage_names_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "garbage.bin",
        &[0x00, 0x9f, 0x13, 0x37, 0xff, 0x10],
    );
    let (packs, msg, report) = run_err(PipelineConfig {
        mode: virnuc_data::Mode::Protein,
        ..config(vec![fixture("globins45.fa"), f])
    });
    // The first file's packs come through before the error.
    assert!(packs > 0);
    assert!(
        msg.contains("garbage.bin") && msg.contains("record 1"),
        "{msg}"
    );
    assert_eq!(report.files[0].records, 45);
    assert!(!report.complete);
}

#[test]
fn bad_record_in_the_middle_names_its_number_and_id() {
    let dir = tempfile::tempdir().unwrap();
    // A FASTQ whose third record has a quality line of the wrong length.
    let f = write(
        dir.path(),
        "bad.fq",
        b"@a\nACGTACGTAC\n+\nIIIIIIIIII\n@b\nACGTACGTAC\n+\nIIIIIIIIII\n@c\nACGT\n+\nII\n",
    );
    let (_, msg, _) = run_err(config(vec![f]));
    assert!(msg.contains("bad.fq") && msg.contains("record 3"), "{msg}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let (_, msg, _) = run_err(config(vec!["/nonexistent/x.fa".into()]));
    assert!(msg.contains("/nonexistent/x.fa"), "{msg}");
}

#[test]
fn crlf_gives_the_same_sequences_as_lf() {
    let dir = tempfile::tempdir().unwrap();
    let lf = std::fs::read_to_string(fixture("lambda_virus.fa")).unwrap();
    let crlf = lf.replace('\n', "\r\n");
    let a = write(dir.path(), "lf.fa", lf.as_bytes());
    let b = write(dir.path(), "crlf.fa", crlf.as_bytes());
    let (pa, ra) = run(config(vec![a]));
    let (pb, rb) = run(config(vec![b]));
    assert_eq!(sequences(&pa), sequences(&pb));
    assert_eq!(ra.stages, rb.stages);
    assert!(!sequences(&pb)[0].1.contains('\r'));
}

#[test]
fn truncated_gzip_names_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    // ~2 MB of FASTQ so the cut falls well after the reader's first buffer fill.
    let reads = {
        use std::io::Read;
        let mut s = Vec::new();
        flate2::read::GzDecoder::new(
            &std::fs::read(fixture("lambda_reads_200.fq.gz")).unwrap()[..],
        )
        .read_to_end(&mut s)
        .unwrap();
        s
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..40 {
        gz.write_all(&reads).unwrap();
    }
    let gz = gz.finish().unwrap();
    let f = write(dir.path(), "cut.fq.gz", &gz[..gz.len() / 2]);
    let (packs, msg, report) = run_err(config(vec![f]));
    assert!(
        msg.contains("cut.fq.gz") && msg.contains("record "),
        "{msg}"
    );
    // The records before the cut were read and packed.
    assert!(report.records_read > 1000, "{}", report.records_read);
    assert!(packs > 0);
    eprintln!("{msg}");
}

#[test]
fn non_utf8_header_bytes_are_replaced_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "u.fa",
        b">seq\xff\xfe1 d\nATGGCCAAATGG\n>ok\nATGGCC\n",
    );
    let (packs, report) = run(config(vec![f]));
    assert_eq!(report.non_utf8_ids, 1);
    let ids: Vec<_> = sequences(&packs).into_iter().map(|s| s.1).collect();
    assert!(
        ids.iter()
            .any(|i| i.starts_with("seq\u{fffd}\u{fffd}1_chunk_1"))
    );
}

#[test]
fn duplicate_ids_are_counted_and_indices_stay_unique() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "d.fa",
        b">x a\nATGGCC\n>x b\nATGGCC\n>y\nATG\n>x\nAAA\n",
    );
    let (packs, report) = run(config(vec![f]));
    assert_eq!(report.duplicate_ids, 2);
    assert!(!report.duplicate_check_capped);
    let seqs = sequences(&packs);
    let idx: Vec<u64> = seqs.iter().map(|s| s.0).collect();
    assert_eq!(idx, (0..seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn report_is_json_and_accounting_can_fail() {
    let (_, report) = run(config(vec![fixture("lambda_virus.fa")]));
    let json = serde_json::to_string_pretty(&report).unwrap();
    let back: RunReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
    assert!(json.contains("\"frames_dropped_stop\""));
    // Break the balance in each family of counters: the check notices.
    let mut r = report.clone();
    r.stages.frames_kept += 1;
    assert!(r.check_accounting().is_err());
    let mut r = report.clone();
    r.records_empty += 1;
    assert!(r.check_accounting().is_err());
    let mut r = report.clone();
    r.packing.sequences -= 1;
    assert!(r.check_accounting().is_err());
    let mut r = report;
    r.files[0].records += 1;
    assert!(r.check_accounting().is_err());
}

#[test]
fn unknown_residues_become_unk_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.fa", b">p1\nMKV*\n>p2\nmk1J\n");
    let (packs, report) = run(PipelineConfig {
        mode: virnuc_data::Mode::Protein,
        ..config(vec![f])
    });
    assert_eq!(report.stages.unknown_residues, 2); // '1' and 'J'
    assert_eq!(report.stages.terminal_stops_stripped, 1);
    let seqs = sequences(&packs);
    assert_eq!(seqs[0].2, vec![20, 15, 7]);
    assert_eq!(seqs[1].2, vec![20, 15, 3, 3]);
}

#[test]
fn gzip_written_in_two_members_is_read_whole() {
    // bgzip-style multi-member gzip, as many sequencing tools write.
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    for part in [&b">a\nATGGCCAAA\n"[..], &b">b\nATGGCCAAA\n"[..]] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(part).unwrap();
        out.extend(gz.finish().unwrap());
    }
    let f = write(dir.path(), "mm.fa.gz", &out);
    let (_, report) = run(config(vec![f]));
    assert_eq!(report.records_read, 2);
}

// Regression tests, named after the defect they pin down.

fn bz2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn regression_multistream_bz2_reads_every_stream() {
    // pbzip2/lbzip2 output and `cat a.bz2 b.bz2` are several bzip2 streams in one file.
    let dir = tempfile::tempdir().unwrap();
    let mut out = bz2(b">a\nATGGCCAAA\n>b\nATGGCCAAA\n");
    out.extend(bz2(b">c\nATGGCCAAA\n"));
    out.extend(bz2(b">d\nATGGCCAAA\n>e\nATGGCCAAA\n"));
    let f = write(dir.path(), "ms.fa.bz2", &out);
    let (packs, report) = run(config(vec![f]));
    assert_eq!(report.records_read, 5);
    let ids: Vec<String> = sequences(&packs).into_iter().map(|s| s.1).collect();
    for rec in ["a", "b", "c", "d", "e"] {
        assert!(
            ids.iter().any(|i| i.starts_with(&format!("{rec}_chunk_1"))),
            "{rec} missing from {ids:?}"
        );
    }
}

#[test]
fn regression_compressed_file_cut_in_its_first_bytes_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read(fixture("lambda_virus.fa")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&text).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&text[..], 1).unwrap();
    let bz = bz2(&text);
    for (name, bytes) in [
        ("cut.fa.gz", &gz[..12]),
        ("cut.fa.zst", &zst[..6]),
        ("cut.fa.bz2", &bz[..12]),
    ] {
        let f = write(dir.path(), name, bytes);
        let (packs, msg, report) = run_err(config(vec![f]));
        assert!(msg.contains(name), "{msg}");
        assert_eq!(packs, 0);
        assert!(!report.files.first().is_some_and(|f| f.empty), "{name}");
    }
}

#[test]
fn regression_compressed_file_of_nothing_is_empty() {
    // The other side of the line: a compressed file that really decodes to nothing is empty.
    let dir = tempfile::tempdir().unwrap();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())
        .finish()
        .unwrap();
    let f = write(dir.path(), "nothing.fa.gz", &gz);
    let g = write(dir.path(), "nothing.fa.bz2", &bz2(b""));
    let h = write(dir.path(), "newline.fa", b"\n");
    let (_, report) = run(config(vec![f, g, h, fixture("lambda_virus.fa")]));
    assert!(report.files[0].empty && report.files[1].empty && report.files[2].empty);
    assert_eq!(report.records_read, 1);
    // One byte that is not a line break is not an empty file.
    let one = write(dir.path(), "one.fa", b"A");
    let (_, msg, _) = run_err(config(vec![one]));
    assert!(msg.contains("one.fa") && msg.contains("one byte"), "{msg}");
}

#[test]
fn regression_directory_as_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "inside.fa", b">a\nATGGCCAAA\n");
    let (packs, msg, _) = run_err(config(vec![dir.path().to_path_buf()]));
    assert_eq!(packs, 0);
    assert!(
        msg.contains(&dir.path().display().to_string()) && msg.contains("directory"),
        "{msg}"
    );
}

#[test]
fn regression_whitespace_inside_sequence_lines_is_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let protein = |text: &[u8], name: &str| {
        let f = write(dir.path(), name, text);
        run(PipelineConfig {
            mode: virnuc_data::Mode::Protein,
            ..config(vec![f])
        })
    };
    let (spaced, report) = protein(b">p\nMKT AY\tQR \nIS F\n", "spaced.fa");
    let (plain, plain_report) = protein(b">p\nMKTAYQR\nISF\n", "plain.fa");
    assert_eq!(sequences(&spaced), sequences(&plain));
    assert_eq!(report.whitespace_removed, 4);
    assert_eq!(plain_report.whitespace_removed, 0);
    assert_eq!(report.stages.unknown_residues, 0);
    // Nucleotide mode: a space must not shift the frame.
    let seq = lambda_seq();
    let mut spaced = b">x\n".to_vec();
    for (i, line) in seq[..3000].chunks(60).enumerate() {
        spaced.extend_from_slice(&line[..7]);
        spaced.extend_from_slice(if i % 2 == 0 { b" " } else { b"\t" });
        spaced.extend_from_slice(&line[7..]);
        spaced.push(b'\n');
    }
    let mut plain = b">x\n".to_vec();
    plain.extend_from_slice(&seq[..3000]);
    plain.push(b'\n');
    let a = write(dir.path(), "spaced_dna.fa", &spaced);
    let b = write(dir.path(), "plain_dna.fa", &plain);
    let (pa, ra) = run(config(vec![a]));
    let (pb, rb) = run(config(vec![b]));
    assert_eq!(sequences(&pa), sequences(&pb));
    assert_eq!(ra.stages, rb.stages);
    assert_eq!(ra.whitespace_removed, 50);
    assert!(
        ra.alterations()
            .iter()
            .any(|a| a == "50 spaces/tabs removed from sequence lines")
    );
}

#[test]
fn regression_protein_fasta_in_nucleotide_mode_is_refused() {
    let (packs, msg, _) = run_err(config(vec![fixture("globins45.fa")]));
    assert_eq!(packs, 0);
    assert!(
        msg.contains("globins45.fa") && msg.contains("--mode protein"),
        "{msg}"
    );
}

#[test]
fn regression_dna_in_protein_mode_is_refused() {
    let (packs, msg, _) = run_err(PipelineConfig {
        mode: virnuc_data::Mode::Protein,
        ..config(vec![fixture("lambda_virus.fa")])
    });
    assert_eq!(packs, 0);
    assert!(
        msg.contains("lambda_virus.fa") && msg.contains("--mode nucleotide"),
        "{msg}"
    );
}

#[test]
fn regression_truncated_fastq_record_is_a_sentence_not_an_enum_name() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "cut.fq",
        b"@a\nACGTACGT\n+\nIIIIIIII\n@b\nACGT\n",
    );
    let (_, msg, _) = run_err(config(vec![f]));
    assert!(!msg.contains("UnexpectedEnd"), "{msg}");
    assert!(
        msg.contains("cut.fq") && msg.contains("record 2") && msg.contains("'b'"),
        "{msg}"
    );
    assert!(msg.contains("ends in the middle of"), "{msg}");
}

#[test]
fn regression_mode_check_passes_real_dna_and_can_be_forced() {
    let dir = tempfile::tempdir().unwrap();
    let seq = lambda_seq();
    let fasta = |s: &[u8]| [b">x\n".as_slice(), s, b"\n"].concat();
    // Lowercase (soft-masked), RNA, long N runs, IUPAC ambiguity codes: all still nucleotide.
    let lower = seq[..5000].to_ascii_lowercase();
    let rna: Vec<u8> = seq[..5000]
        .iter()
        .map(|&b| if b == b'T' { b'U' } else { b })
        .collect();
    let mut n_runs = seq[..5000].to_vec();
    n_runs[500..2500].fill(b'N');
    let iupac: Vec<u8> = seq[..5000]
        .iter()
        .enumerate()
        .map(|(i, &b)| if i % 7 == 0 { b"RYSWKMBDHV"[i % 10] } else { b })
        .collect();
    for (name, s) in [
        ("lower.fa", lower),
        ("rna.fa", rna),
        ("n.fa", n_runs),
        ("iupac.fa", iupac),
    ] {
        let f = write(dir.path(), name, &fasta(&s));
        let (packs, report) = run(config(vec![f]));
        assert!(!packs.is_empty(), "{name}");
        assert_eq!(report.records_read, 1, "{name}");
    }
    // --force-mode: the protein file goes through in nucleotide mode (as all-X translations).
    let (_, report) = run(PipelineConfig {
        force_mode: true,
        ..config(vec![fixture("globins45.fa")])
    });
    assert_eq!(report.records_read, 45);
    let (_, report) = run(PipelineConfig {
        force_mode: true,
        mode: virnuc_data::Mode::Protein,
        ..config(vec![fixture("lambda_virus.fa")])
    });
    assert_eq!(report.stages.records_processed, 1);
}

#[test]
fn regression_mode_check_looks_at_every_file() {
    // A DNA file first, then proteins: the second file is refused by name.
    let (packs, msg, _) = run_err(config(vec![
        fixture("lambda_virus.fa"),
        fixture("globins45.fa"),
    ]));
    assert!(packs > 0);
    assert!(
        msg.contains("globins45.fa") && msg.contains("--mode protein"),
        "{msg}"
    );
}

#[test]
fn regression_data_altering_events_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "alt.fa",
        // Every frame of TTAGCTAGTTAAT has a stop: LAS*, *LVN, S*L, IN*L, LTS*, *LA.
        b">a\nATGGCCAAA\n>a\nATG GCC\n>\nATGGCC\n>e\n>s\nTTAGCTAGTTAAT\n",
    );
    let (_, report) = run(config(vec![f]));
    let got = report.alterations();
    assert_eq!(
        got,
        [
            "1 duplicate id",
            "1 empty id",
            "1 record without sequence skipped",
            "1 space/tab removed from sequence lines",
            "1 chunk with no stop-free frame (nothing embedded for them)",
        ],
        "{report:?}"
    );
    // 62 of lambda's 98 chunks of 500 bp have a stop in all six frames (counted independently
    // with VirNucPro's split_fasta_chunk and the standard code in Python).
    let (_, lambda) = run(config(vec![fixture("lambda_virus.fa")]));
    assert_eq!(
        lambda.alterations(),
        ["62 chunks with no stop-free frame (nothing embedded for them)"]
    );
    let (_, clean) = run(PipelineConfig {
        mode: virnuc_data::Mode::Protein,
        ..config(vec![fixture("globins45.fa")])
    });
    assert!(clean.alterations().is_empty(), "{:?}", clean.alterations());
}

#[test]
fn regression_progress_counts_on_disk_bytes_of_every_input() {
    // The progress bar's numbers: compressed bytes for a compressed file, counted at the file reader.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read(fixture("lambda_virus.fa")).unwrap();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    let a = write(dir.path(), "a.fa.gz", &gz);
    let b = write(dir.path(), "b.fa.bz2", &bz2(&text));
    let total = (gz.len() + std::fs::metadata(&b).unwrap().len() as usize) as u64;
    let mut pipeline = virnuc_data::start(config(vec![a, b])).unwrap();
    let progress = pipeline.input_progress();
    assert_eq!(progress.total_bytes(), Some(total));
    for p in pipeline.by_ref() {
        p.unwrap();
    }
    pipeline.finish().unwrap();
    assert_eq!(progress.bytes_read(), total);
    // Standard input has no size.
    let p = virnuc_data::InputProgress::for_paths(&["-".into()]);
    assert_eq!(p.total_bytes(), None);
}

#[test]
fn regression_mode_mismatch_yields_no_protein_of_the_refused_file_in_the_sequential_view() {
    // `virnuc-trt translate` streams proteins to standard output: none of a refused file's may come
    // before the error; those of an earlier, accepted file do.
    let cfg = config(vec![fixture("lambda_virus.fa"), fixture("globins45.fa")]);
    let mut got = Vec::new();
    let mut error = None;
    for p in virnuc_data::proteins(&cfg).unwrap() {
        match p {
            Ok(p) => got.push(p.id),
            Err(e) => error = Some(e.to_string()),
        }
    }
    let error = error.expect("refused");
    assert!(
        error.contains("globins45.fa") && error.contains("--mode protein"),
        "{error}"
    );
    assert!(
        !got.is_empty() && got.iter().all(|id| id.contains("_chunk_")),
        "{got:?}"
    );
    let globins_only = virnuc_data::proteins(&config(vec![fixture("globins45.fa")]))
        .unwrap()
        .collect::<Vec<_>>();
    assert_eq!(globins_only.len(), 1, "only the error");
    assert!(globins_only[0].is_err());
}
