//! parse → chunk → translate → tokenize → pack on arbitrary bytes: never panics, and every output
//! keeps the data path's invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virnuc_core::alphabet;
use virnuc_data::pack::{PackItem, Packer, PackerConfig};
use virnuc_data::{Input, LongPolicy, Mode, PipelineConfig, proteins_from, tokenize::tokenize};

fuzz_target!(|data: &[u8]| {
    // First byte: settings; the rest: the file (any compression needletail detects).
    let Some((&knobs, file)) = data.split_first() else {
        return;
    };
    let config = PipelineConfig {
        mode: if knobs & 1 == 0 {
            Mode::Nucleotide
        } else {
            Mode::Protein
        },
        virnucpro_compat: knobs & 2 != 0,
        chunk_len: [3, 7, 300, 500][usize::from(knobs >> 2 & 3)],
        long: [
            LongPolicy::Split,
            LongPolicy::Truncate,
            LongPolicy::Skip,
            LongPolicy::Split,
        ][usize::from(knobs >> 4 & 3)],
        max_residues: if knobs & 64 != 0 { 5 } else { 1022 },
        ..PipelineConfig::default()
    };
    let input = Input::Reader("fuzz".into(), Box::new(std::io::Cursor::new(file.to_vec())));
    let Ok(proteins) = proteins_from(vec![input], &config) else {
        return;
    };
    let mut packer = Packer::new(PackerConfig {
        budget: 64,
        max_seqs: Some(7),
        window: 5,
    });
    let mut packs = Vec::new();
    let mut expected = 0u64;
    for item in proteins {
        let Ok(p) = item else {
            break;
        };
        assert_eq!(p.index, expected);
        expected += 1;
        assert!(p.residues.chars().count() <= config.max_residues);
        let mut tokens = Vec::new();
        tokenize(p.residues.as_bytes(), &mut tokens);
        assert!(
            tokens
                .iter()
                .all(|&t| (t as usize) < alphabet::TOKENS.len())
        );
        if config.mode == Mode::Nucleotide {
            assert!(p.id.contains("_chunk_"));
            assert!(!p.residues.contains('*'));
        }
        let meta = virnuc_core::SequenceMeta {
            index: p.index,
            id: p.id,
            residues: 0,
        };
        packer.push(PackItem { meta, tokens }, &mut packs);
    }
    packer.finish(&mut packs);
    let mut seen: Vec<u64> = packs
        .iter()
        .flat_map(|b| b.sequences.iter().map(|s| s.index))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..expected).collect::<Vec<_>>());
    for b in &packs {
        assert!(b.num_tokens() <= 64 || b.num_sequences() == 1);
        assert_eq!(*b.cu_seqlens.last().unwrap_or(&0) as usize, b.num_tokens());
    }
});
