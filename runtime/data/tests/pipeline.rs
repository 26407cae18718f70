#![allow(clippy::unwrap_used)]
//! The pipeline end to end on real genomes, determinism, resume, cancellation, compression.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;
use virnuc_core::alphabet;
use virnuc_data::{LongPolicy, Mode, PipelineConfig, chunk::chunk_count, proteins};

#[test]
fn lambda_chunk_counts_match_the_formula() {
    let len = lambda_seq().len();
    assert_eq!(len, 48_502);
    for (chunk_len, expect) in [(500, 98), (300, 162)] {
        // Hand check: ceil(48502 / 500) = 98 (97·500 = 48,500 < 48,502); ceil(48502 / 300) = 162.
        assert_eq!(chunk_count(len, chunk_len), expect);
        let (packs, report) = run(PipelineConfig {
            chunk_len,
            ..config(vec![fixture("lambda_virus.fa")])
        });
        assert_eq!(report.records_read, 1);
        assert_eq!(report.stages.chunks, expect as u64);
        assert_eq!(report.stages.frames, 6 * expect as u64);
        assert!(report.stages.frames_kept > 0);
        // Every packed id is a chunk frame of the lambda record, chunk numbers 1..=n.
        for (_, id, residues) in sequences(&packs) {
            let (record, rest) = id.split_once("_chunk_").unwrap();
            assert_eq!(record, "gi|9626243|ref|NC_001416.1|");
            let k: usize = rest[..rest.len() - 2].parse().unwrap();
            assert!((1..=expect).contains(&k));
            assert!(["F1", "F2", "F3", "R1", "R2", "R3"].contains(&&rest[rest.len() - 2..]));
            assert!(residues.len() <= chunk_len / 3);
            assert!(!residues.contains(&i64::from(alphabet::UNK)));
        }
    }
}

#[test]
fn packs_carry_exactly_the_proteins_of_the_sequential_view() {
    let config = config(vec![
        fixture("lambda_virus.fa"),
        fixture("lambda_reads_200.fq.gz"),
    ]);
    let (packs, report) = run(config.clone());
    let expected: Vec<_> = proteins(&config).unwrap().map(|p| p.unwrap()).collect();
    let got = sequences(&packs);
    assert_eq!(got.len(), expected.len());
    assert_eq!(report.stages.sequences, expected.len() as u64);
    for ((index, id, tokens), p) in got.iter().zip(&expected) {
        assert_eq!(*index, p.index);
        assert_eq!(id, &p.id);
        let mut want = vec![];
        virnuc_data::tokenize::tokenize(p.residues.as_bytes(), &mut want);
        let want: Vec<i64> = want[1..want.len() - 1]
            .iter()
            .map(|&t| i64::from(t))
            .collect();
        assert_eq!(tokens, &want);
    }
    assert_eq!(report.files.len(), 2);
    assert_eq!(report.files[1].records, 200);
}

#[test]
fn globins_in_protein_mode() {
    let (packs, report) = run(PipelineConfig {
        mode: Mode::Protein,
        token_budget: 1024,
        ..config(vec![fixture("globins45.fa")])
    });
    assert_eq!(report.records_read, 45);
    assert_eq!(report.stages.sequences, 45);
    let seqs = sequences(&packs);
    assert_eq!(seqs[0].1, "MYG_ESCGI");
    assert!(seqs[0].2.starts_with(&[7, 4, 8, 13])); // V L S D
    let residues: usize = std::fs::read_to_string(fixture("globins45.fa"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('>'))
        .map(|l| l.trim_end_matches(['\n', '\r']).len())
        .sum();
    assert_eq!(report.packing.tokens as usize, residues + 2 * 45);
    assert!(packs.iter().all(|p| p.num_tokens() <= 1024));
}

/// About 1 MB of records cut from lambda, so the reader makes several batches.
fn many_records(dir: &std::path::Path) -> std::path::PathBuf {
    let lambda = lambda_seq();
    let mut text = Vec::new();
    let mut k = 0usize;
    while text.len() < 1_200_000 {
        let start = (k * 7919) % (lambda.len() - 3000);
        let len = 100 + (k * 104_729) % 2900;
        writeln!(text, ">r{k} sample").unwrap();
        text.extend_from_slice(&lambda[start..start + len]);
        text.push(b'\n');
        k += 1;
    }
    write(dir, "many.fa", &text)
}

#[test]
fn output_is_identical_for_1_and_4_workers() {
    let dir = tempfile::tempdir().unwrap();
    let input = many_records(dir.path());
    let base = PipelineConfig {
        window: 256,
        token_budget: 4096,
        prefetch: 1,
        ..config(vec![input])
    };
    let (one, r1) = run(PipelineConfig {
        workers: 1,
        ..base.clone()
    });
    let (four, r4) = run(PipelineConfig { workers: 4, ..base });
    assert!(one.len() > 50, "{}", one.len());
    assert_eq!(one, four);
    assert_eq!(r1, r4);
}

/// Resume work where the indices below `done` are done; records what it was asked.
struct Done {
    done: u64,
    checked: std::sync::Mutex<Vec<u64>>,
    finished: std::sync::atomic::AtomicBool,
}

impl virnuc_data::ResumeCheck for Done {
    fn is_done(&self, index: u64) -> bool {
        index < self.done
    }
    fn check(
        &self,
        index: u64,
        _id: &str,
        _digest: u64,
        _file: u32,
    ) -> Result<bool, virnuc_data::ResumeMismatch> {
        self.checked.lock().expect("lock").push(index);
        Ok(self.is_done(index))
    }
    fn finish(&self) -> Result<(), virnuc_data::ResumeMismatch> {
        self.finished
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn resume_skips_done_packs_and_counts() {
    let input = fixture("lambda_virus.fa");
    let small = |inputs| PipelineConfig {
        token_budget: 1024,
        window: 64,
        ..config(inputs)
    };
    let (all_packs, whole) = run(small(vec![input.clone()]));
    let all = sequences(&all_packs);
    let check = Arc::new(Done {
        done: all.len() as u64 / 2,
        checked: Default::default(),
        finished: Default::default(),
    });
    let (packs, report) = run(PipelineConfig {
        skip: Some(check.clone()),
        ..small(vec![input])
    });
    // Every sequence was shown to the check, in index order, and the check was finished.
    let checked = check.checked.lock().expect("lock").clone();
    assert_eq!(checked, (0..all.len() as u64).collect::<Vec<_>>());
    assert!(check.finished.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(report.skipped_resume, check.done);
    // Packing is that of the whole input; the delivered packs are those with undone work, as made.
    assert_eq!(report.packing, whole.packing);
    let undone: Vec<_> = all_packs
        .iter()
        .filter(|p| p.sequences.iter().any(|m| m.index >= check.done))
        .cloned()
        .collect();
    assert!(undone.len() < all_packs.len(), "some packs are all done");
    assert_eq!(packs, undone);
    assert_eq!(
        report.packs_skipped_resume,
        (all_packs.len() - undone.len()) as u64
    );
    let written = sequences(&packs)
        .iter()
        .filter(|s| s.0 >= check.done)
        .count() as u64;
    report
        .check_consumer(packs.len() as u64, written)
        .expect("accounting");
    assert!(
        report
            .check_consumer(packs.len() as u64 + 1, written)
            .is_err()
    );
    assert!(
        report
            .check_consumer(packs.len() as u64, written + 1)
            .is_err()
    );
}

#[test]
fn consumer_stopping_early_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut pipeline = virnuc_data::start(PipelineConfig {
        token_budget: 256,
        window: 8,
        prefetch: 1,
        ..config(vec![many_records(dir.path())])
    })
    .unwrap();
    assert!(pipeline.next().unwrap().is_ok());
    let report = pipeline.finish().unwrap();
    assert!(!report.complete);
    assert!(report.check_accounting().is_err());
}

#[test]
fn compressed_inputs_give_the_same_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let plain = std::fs::read(fixture("lambda_virus.fa")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = write(dir.path(), "l.fa.gz", &gz.finish().unwrap());
    let zst = write(
        dir.path(),
        "l.fa.zst",
        &zstd::encode_all(&plain[..], 3).unwrap(),
    );
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bz.write_all(&plain).unwrap();
    let bz = write(dir.path(), "l.fa.bz2", &bz.finish().unwrap());
    let (reference, _) = run(config(vec![fixture("lambda_virus.fa")]));
    let reference = sequences(&reference);
    let (packs, report) = run(config(vec![gz, zst, bz]));
    assert_eq!(report.files.len(), 3);
    assert_eq!(report.duplicate_ids, 2);
    let got = sequences(&packs);
    let n = reference.len();
    assert_eq!(got.len(), 3 * n);
    for (k, chunk) in got.chunks(n).enumerate() {
        for (a, b) in chunk.iter().zip(&reference) {
            assert_eq!(a.0, b.0 + (k * n) as u64);
            assert_eq!((&a.1, &a.2), (&b.1, &b.2));
        }
    }
}

#[test]
fn long_policies_split_truncate_skip() {
    let dir = tempfile::tempdir().unwrap();
    let long: String = "ACDEFGHIKLMNPQRSTVWY".repeat(60); // 1200 residues
    let input = write(
        dir.path(),
        "p.fa",
        format!(">big\n{long}\n>small\nMKV\n").as_bytes(),
    );
    let base = PipelineConfig {
        mode: Mode::Protein,
        max_residues: 500,
        ..config(vec![input])
    };
    let names = |long| {
        let c = PipelineConfig {
            long,
            ..base.clone()
        };
        let (packs, report) = run(c.clone());
        let ps: Vec<_> = proteins(&c).unwrap().map(|p| p.unwrap()).collect();
        assert_eq!(sequences(&packs).len(), ps.len());
        (ps, report)
    };
    let (split, r) = names(LongPolicy::Split);
    let ids: Vec<_> = split.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["big_w1", "big_w2", "big_w3", "small"]);
    assert_eq!(
        split[..3]
            .iter()
            .map(|p| p.residues.as_str())
            .collect::<String>(),
        long
    );
    assert_eq!((r.stages.long_split, r.stages.split_extra_windows), (1, 2));
    let (trunc, r) = names(LongPolicy::Truncate);
    assert_eq!(trunc[0].residues, long[..500]);
    assert_eq!(
        (r.stages.long_truncated, r.stages.residues_truncated),
        (1, 700)
    );
    let (skip, r) = names(LongPolicy::Skip);
    assert_eq!(skip.len(), 1);
    assert_eq!(skip[0].index, 0);
    assert_eq!(r.stages.long_skipped, 1);
}

#[test]
fn virnucpro_compat_drops_ambiguous_codons() {
    let dir = tempfile::tempdir().unwrap();
    // F1: ATG GCN AAA TGG → default M X K W; VirNucPro drops GCN → M K W (positions shift).
    let input = write(dir.path(), "n.fa", b">c1\nATGGCNAAATGG\n");
    let run_mode = |compat| {
        let c = PipelineConfig {
            virnucpro_compat: compat,
            ..config(vec![input.clone()])
        };
        let ps: Vec<_> = proteins(&c).unwrap().map(|p| p.unwrap()).collect();
        ps.into_iter()
            .map(|p| (p.id, p.residues))
            .collect::<Vec<_>>()
    };
    let default = run_mode(false);
    let compat = run_mode(true);
    assert_eq!(default[0], ("c1_chunk_1F1".to_string(), "MXKW".to_string()));
    assert_eq!(compat[0], ("c1_chunk_1F1".to_string(), "MKW".to_string()));
    // R1 of the reverse complement CCATTTNGCCAT: CCA TTT NGC CAT → P F X H / P F H.
    assert!(default.contains(&("c1_chunk_1R1".to_string(), "PFXH".to_string())));
    assert!(compat.contains(&("c1_chunk_1R1".to_string(), "PFH".to_string())));
}

#[test]
fn long_record_shared_by_workers_matches_the_sequential_view() {
    // 1.2 Mbp in one record: the reader cuts it into parts at chunk boundaries (several batches),
    // workers translate parts in parallel; names, indices and residues must equal the uncut path.
    let dir = tempfile::tempdir().unwrap();
    let lambda = lambda_seq();
    let mut text = b">long genome\n".to_vec();
    for k in 0..25 {
        // A different rotation each time so that chunks differ.
        text.extend_from_slice(&lambda[k * 997..]);
        text.extend_from_slice(&lambda[..k * 997]);
    }
    text.extend_from_slice(b"\n>short\nATGGCCAAATGG\n");
    let input = write(dir.path(), "long.fa", &text);
    for chunk_len in [300, 500] {
        let c = PipelineConfig {
            chunk_len,
            workers: 3,
            ..config(vec![input.clone()])
        };
        let (packs, report) = run(c.clone());
        assert_eq!(report.records_read, 2);
        assert_eq!(report.stages.records_processed, 2);
        assert_eq!(
            report.stages.chunks as usize,
            chunk_count(25 * lambda.len(), chunk_len) + 1
        );
        let expected: Vec<_> = proteins(&c).unwrap().map(|p| p.unwrap()).collect();
        let got = sequences(&packs);
        assert_eq!(got.len(), expected.len());
        for ((index, id, tokens), p) in got.iter().zip(&expected) {
            assert_eq!((*index, id), (p.index, &p.id));
            assert_eq!(tokens.len(), p.residues.len());
        }
    }
}

#[test]
fn compat_mode_equals_virnucpro_golden_output() {
    // The .faa files were written by VirNucPro's own `split_fasta_chunk` + `identify_seq` (units.py,
    // Li-Jing-1997/VirNucPro, run with Biopython 1.88; see tests/fixtures/README.md) on the synthetic
    // records: lengths 1-12,345 bp cut from lambda with IUPAC codes, N and lowercase sprinkled in.
    for chunk_len in [300, 500] {
        let expected =
            std::fs::read_to_string(fixture(&format!("virnucpro_synthetic.c{chunk_len}.faa")))
                .unwrap();
        let expected: Vec<(String, String)> = expected
            .lines()
            .collect::<Vec<_>>()
            .chunks(2)
            .map(|r| (r[0][1..].to_string(), r[1].to_string()))
            .collect();
        let run_mode = |compat| {
            let c = PipelineConfig {
                chunk_len,
                virnucpro_compat: compat,
                ..config(vec![fixture("virnucpro_synthetic.fa")])
            };
            proteins(&c)
                .unwrap()
                .map(|p| p.map(|p| (p.id, p.residues)).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(expected.len() > 40);
        assert_eq!(run_mode(true), expected);
        // The default (ambiguous codon → X) differs on these records: the comparison can fail.
        assert_ne!(run_mode(false), expected);
    }
}

fn read_fasta_pairs(path: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|r| (r[0][1..].to_string(), r[1].to_string()))
        .collect()
}

#[test]
fn compat_dna_spans_equal_virnucpro_golden_output() {
    // The .fna files hold the `nucleotide` field of VirNucPro's own `identify_seq` for the same frames
    // as the .faa files (tools/virnucpro_golden.py; see tests/fixtures/README.md): one base past the
    // codons, capped at the chunk's end, shortened and shifted where ambiguous codons were dropped.
    for chunk_len in [300, 500] {
        let expected = read_fasta_pairs(&fixture(&format!("virnucpro_synthetic.c{chunk_len}.fna")));
        let run_mode = |compat| {
            let c = PipelineConfig {
                chunk_len,
                virnucpro_compat: compat,
                ..config(vec![fixture("virnucpro_synthetic.fa")])
            };
            proteins(&c)
                .unwrap()
                .map(|p| p.map(|p| (p.id, p.dna)).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(expected.len() > 40);
        let compat = run_mode(true);
        assert_eq!(compat, expected);
        // Frames whose span is shorter than one base past their codons exist in the fixture (capped
        // at the chunk end, or after dropped codons), so the `+1` and the cap are both exercised.
        let proteins_of =
            read_fasta_pairs(&fixture(&format!("virnucpro_synthetic.c{chunk_len}.faa")));
        let short = compat
            .iter()
            .zip(&proteins_of)
            .filter(|((_, d), (_, p))| d.len() < 3 * p.len() + 1)
            .count();
        assert!(short > 0 && short < compat.len(), "{short}");
        // The default span (the coded bases exactly) differs: the comparison can fail.
        let default = run_mode(false);
        assert_ne!(default, expected);
        for ((id, dna), (id_p, protein)) in default.iter().zip(&run_mode_proteins(chunk_len)) {
            assert_eq!(id, id_p);
            assert_eq!(dna.len(), 3 * protein.len(), "{id}");
        }
    }
}

fn run_mode_proteins(chunk_len: usize) -> Vec<(String, String)> {
    let c = PipelineConfig {
        chunk_len,
        ..config(vec![fixture("virnucpro_synthetic.fa")])
    };
    proteins(&c)
        .unwrap()
        .map(|p| p.map(|p| (p.id, p.residues)).unwrap())
        .collect()
}

/// `--input-shard I/N`: the shards of a run partition its records: together they give exactly the
/// sequences of the unsharded run, each in one shard, whole records per shard, and every shard's
/// report accounts for the records it left to the others.
#[test]
fn input_shards_partition_the_records_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    // An empty record at an odd position, so that one shard owns it and the others pass over it.
    let extra = write(
        dir.path(),
        "extra.fa",
        b">empty_one\n\n>short\nATGGCTAAATAGCCC\n>long\nATGGCGGCGGCGGCGGCGGCGGCGGCGGCGGCGGCGGCG\n",
    );
    let inputs = vec![
        fixture("lambda_reads_200.fq.gz"),
        extra,
        fixture("lambda_virus.fa"),
    ];
    let (full_packs, full) = run(config(inputs.clone()));
    let record_of = |id: &str| id.split("_chunk_").next().unwrap().to_string();
    let mut full_seqs: Vec<(String, Vec<i64>)> = sequences(&full_packs)
        .into_iter()
        .map(|(_, id, t)| (id, t))
        .collect();
    full_seqs.sort();
    for count in [1u64, 2, 3, 7] {
        let mut union = vec![];
        let mut owner = std::collections::HashMap::new();
        let mut empty_total = 0;
        for index in 0..count {
            let shard = virnuc_data::InputShard { index, count };
            let (packs, report) = run(PipelineConfig {
                input_shard: Some(shard),
                ..config(inputs.clone())
            });
            report.check_accounting().unwrap();
            assert_eq!(
                report.records_read, full.records_read,
                "every shard reads everything"
            );
            assert_eq!(report.input_shard, Some(shard));
            empty_total += report.records_empty;
            let seqs = sequences(&packs);
            // Output indices of a shard run are its own, dense from 0.
            let mut idx: Vec<u64> = seqs.iter().map(|s| s.0).collect();
            idx.sort_unstable();
            assert!(idx.iter().enumerate().all(|(i, &x)| i as u64 == x));
            for (_, id, tokens) in seqs {
                // Whole records per shard: every chunk and frame of a record lands in one shard.
                let prev = owner.insert(record_of(&id), index);
                assert!(prev.is_none_or(|p| p == index), "{id} split across shards");
                union.push((id, tokens));
            }
        }
        union.sort();
        assert_eq!(
            union, full_seqs,
            "{count} shards together = the unsharded run"
        );
        assert_eq!(
            empty_total, full.records_empty,
            "each empty record counted by one shard"
        );
    }
}

#[test]
fn input_shard_syntax_and_bounds() {
    use virnuc_data::InputShard;
    let ok: InputShard = "3/4".parse().unwrap();
    assert_eq!((ok.index, ok.count), (3, 4));
    assert_eq!(ok.to_string(), "3/4");
    assert!(ok.takes(7) && !ok.takes(8));
    for bad in ["4/4", "1/0", "-1/4", "1", "a/b", "1/2/3", ""] {
        let e = bad.parse::<InputShard>().unwrap_err();
        assert!(e.contains("expected I/N"), "{bad}: {e}");
    }
    let cfg = PipelineConfig {
        input_shard: Some(InputShard { index: 2, count: 2 }),
        ..config(vec![fixture("lambda_virus.fa")])
    };
    assert!(virnuc_data::start(cfg.clone()).is_err());
    let sequential = PipelineConfig {
        input_shard: Some(InputShard { index: 0, count: 2 }),
        ..cfg
    };
    assert!(
        proteins(&sequential).is_err(),
        "the sequential view must refuse shards"
    );
}

/// A tokenizer.json of single bases with `[CLS] … [SEP]` around each sequence: enough for the data
/// path to run a DNA-span encoder without the real DNABERT-S files.
fn base_tokenizer(dir: &std::path::Path) -> std::path::PathBuf {
    let cls = r#"{"SpecialToken":{"id":"[CLS]","type_id":0}}"#;
    let sep = r#"{"SpecialToken":{"id":"[SEP]","type_id":0}}"#;
    let json = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":null,"decoder":null,
"post_processor":{{"type":"TemplateProcessing",
 "single":[{cls},{{"Sequence":{{"id":"A","type_id":0}}}},{sep}],
 "pair":[{cls},{{"Sequence":{{"id":"A","type_id":0}}}},{sep},{{"Sequence":{{"id":"B","type_id":1}}}},{sep}],
 "special_tokens":{{"[CLS]":{{"id":"[CLS]","ids":[1],"tokens":["[CLS]"]}},
                   "[SEP]":{{"id":"[SEP]","ids":[2],"tokens":["[SEP]"]}}}}}},
"model":{{"type":"BPE","dropout":null,"unk_token":"[UNK]","continuing_subword_prefix":null,
 "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
 "vocab":{{"[UNK]":0,"[CLS]":1,"[SEP]":2,"A":3,"C":4,"G":5,"T":6}},"merges":[]}}}}"#
    );
    write(dir, "tokenizer.json", json.as_bytes())
}

#[test]
fn a_dna_only_run_neither_cuts_nor_counts_long_proteins() {
    use virnuc_core::ModelFamily;
    use virnuc_data::tokenize::Encoder;
    let dir = tempfile::tempdir().unwrap();
    // GCT repeated: no stop in any of the six frames; every protein has 19-20 residues.
    let seq = "GCT".repeat(20);
    let input = write(dir.path(), "n.fa", format!(">c\n{seq}\n").as_bytes());
    let dna = Arc::new(
        Encoder::with_tokenizer_file(ModelFamily::DnabertS, &base_tokenizer(dir.path())).unwrap(),
    );
    let base = PipelineConfig {
        mode: Mode::Nucleotide,
        chunk_len: 60,
        max_residues: 10,
        long: LongPolicy::Truncate,
        ..config(vec![input])
    };
    // With the protein model the long policy acts on each of the six frames…
    let (_, esm) = run(base.clone());
    assert_eq!((esm.stages.sequences, esm.stages.long_truncated), (6, 6));
    // …with the DNA model alone nothing is cut (each frame's whole span is embedded), so nothing
    // may be reported as cut, and `skip` drops nothing either.
    for long in [LongPolicy::Truncate, LongPolicy::Skip] {
        let (packs, r) = run(PipelineConfig {
            encoders: vec![dna.clone()],
            long,
            ..base.clone()
        });
        assert_eq!(r.stages.sequences, 6, "{long:?}");
        assert_eq!(
            (
                r.stages.long_truncated,
                r.stages.residues_truncated,
                r.stages.long_skipped
            ),
            (0, 0, 0),
            "{long:?}"
        );
        // [CLS] + 57-60 bases + [SEP] per frame: the spans are whole.
        for p in &packs {
            for i in 0..p.sequences.len() {
                assert!(p.token_range(i).len() >= 59, "{long:?}");
            }
        }
    }
}
