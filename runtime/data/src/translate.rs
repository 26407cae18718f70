//! Six-frame translation of a DNA chunk, VirNucPro style.
//!
//! Our reading of VirNucPro (`units.py`: `translate_dna`, `reverse_complement`, `identify_seq`;
//! `prediction.py`: `process_record`, `make_predictdata`), restated:
//!
//! * the chunk is upper-cased; the reverse complement swaps `A↔T`, `C↔G` and leaves every other
//!   character as it is (so `N` stays `N`), then reverses;
//! * frame `f` (0, 1, 2) reads codons at `f, f+3, …` while a whole codon fits; F1–F3 are the frames of
//!   the chunk, R1–R3 the frames of its reverse complement, in the order F1 F2 F3 R1 R2 R3;
//! * each codon is looked up in the standard genetic code over `ACGT`; a codon with any other
//!   character is **not in the table and yields nothing**: the residue is dropped, so the protein is
//!   one residue shorter and every later residue moves one position left (the reading frame itself
//!   does not move). That is VirNucPro's behaviour, reproduced by [`Ambiguity::Drop`]
//!   (`virnucpro_compat`). Our default, [`Ambiguity::X`], writes `X` for such a codon, keeping residue
//!   positions aligned with the DNA; `U` is read as `T` in the default only;
//! * a frame is kept when its protein has no stop (`*`) and is not empty (`make_predictdata` drops
//!   empty proteins); it is named `<chunk>F1` … `<chunk>R3`.
//!
//! What a DNA model (DNABERT-S) gets from a kept frame is its **DNA span** ([`Translator::dna_span`],
//! [`SpanRule`]): VirNucPro's (`identify_seq`) is `s[f : f + 1 + 3·aa_len]` of the upper-cased chunk
//! (forward frames) or of its reverse complement (reverse frames), `f` = 0, 1, 2 the frame's offset and
//! `aa_len` the protein's length **after** ambiguous codons were dropped — one base more than the
//! codons, unless capped at the chunk's end, and shorter than (and shifted from) the codons when a
//! codon was dropped. Our default is the coded bases exactly, `s[f : f + 3·codons]`.
//!
//! The hot path works on 2-bit base codes (`A=0 C=1 G=2 T=3`, 4 = anything else) and a 64-entry codon
//! table, and stops reading a frame at its first stop codon, since such a frame is dropped anyway.

/// What to do with a codon holding a character other than `ACGT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// Translate to `X` (default).
    X,
    /// Drop the codon's residue, as VirNucPro does.
    Drop,
}

/// Which bases of a kept frame a DNA model gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanRule {
    /// The frame's codons exactly: `[f, f + 3·codons)` (default).
    Coded,
    /// VirNucPro's `seq[f : f + 1 + 3·aa_len]`, capped at the chunk's end (`virnucpro_compat`).
    VirNucPro,
}

impl SpanRule {
    /// The base range of a frame at `offset` whose protein has `aa_len` residues, in a strand of
    /// `strand_len` bases. In [`SpanRule::Coded`] `aa_len` is the number of codons (no residue is
    /// dropped in the default mode).
    ///
    /// ```
    /// use virnuc_data::translate::SpanRule;
    /// assert_eq!(SpanRule::VirNucPro.range(1, 2, 10), 1..8); // one base past the 2 codons
    /// assert_eq!(SpanRule::VirNucPro.range(2, 2, 8), 2..8); // capped at the end
    /// assert_eq!(SpanRule::Coded.range(1, 2, 10), 1..7);
    /// ```
    pub fn range(self, offset: usize, aa_len: usize, strand_len: usize) -> std::ops::Range<usize> {
        let start = offset.min(strand_len);
        let end = match self {
            SpanRule::Coded => offset + 3 * aa_len,
            SpanRule::VirNucPro => offset + 1 + 3 * aa_len,
        };
        start..end.clamp(start, strand_len)
    }
}

/// Amino acid of codon `16·b1 + 4·b2 + b3` with `A=0 C=1 G=2 T=3` (standard genetic code).
const CODON_TABLE: &[u8; 64] = b"KNKNTTTTRSRSIIMIQHQHPPPPRRRRLLLLEDEDAAAAGGGGVVVV*Y*YSSSS*CWCLFLF";

/// Code of a base: 0..4 for `ACGT` (either case), 4 for anything else; `u`/`U` is `T` when asked.
const fn base_codes(u_is_t: bool) -> [u8; 256] {
    let mut t = [4u8; 256];
    t[b'A' as usize] = 0;
    t[b'a' as usize] = 0;
    t[b'C' as usize] = 1;
    t[b'c' as usize] = 1;
    t[b'G' as usize] = 2;
    t[b'g' as usize] = 2;
    t[b'T' as usize] = 3;
    t[b't' as usize] = 3;
    if u_is_t {
        t[b'U' as usize] = 3;
        t[b'u' as usize] = 3;
    }
    t
}
static CODES_DEFAULT: [u8; 256] = base_codes(true);
static CODES_COMPAT: [u8; 256] = base_codes(false);

/// One of the six reading frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    F1,
    F2,
    F3,
    R1,
    R2,
    R3,
}

impl Frame {
    pub const ALL: [Frame; 6] = [
        Frame::F1,
        Frame::F2,
        Frame::F3,
        Frame::R1,
        Frame::R2,
        Frame::R3,
    ];

    /// Suffix appended to the chunk name.
    pub fn suffix(self) -> &'static str {
        match self {
            Frame::F1 => "F1",
            Frame::F2 => "F2",
            Frame::F3 => "F3",
            Frame::R1 => "R1",
            Frame::R2 => "R2",
            Frame::R3 => "R3",
        }
    }

    fn offset(self) -> usize {
        match self {
            Frame::F1 | Frame::R1 => 0,
            Frame::F2 | Frame::R2 => 1,
            Frame::F3 | Frame::R3 => 2,
        }
    }

    fn reverse(self) -> bool {
        matches!(self, Frame::R1 | Frame::R2 | Frame::R3)
    }
}

/// Outcome of translating one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Stop-free, non-empty protein: kept.
    Kept,
    /// Contains a stop codon: dropped.
    Stop,
    /// No residue (chunk shorter than a codon past the offset, or every codon dropped): dropped.
    Empty,
}

/// Amino acid by `64·b1 + 8·b2 + b3` over base codes 0..=4: the standard code for `ACGT` codons,
/// 0 for a codon holding code 4 (anything else). One lookup, no branch on ambiguity.
static CODON_LUT: [u8; 512] = {
    let mut t = [0u8; 512];
    let mut i = 0;
    while i < 64 {
        t[(i >> 4) << 6 | ((i >> 2) & 3) << 3 | (i & 3)] = CODON_TABLE[i];
        i += 1;
    }
    t
};

/// Reusable buffers for translating chunks without allocating per chunk.
#[derive(Debug, Default)]
pub struct Translator {
    /// Base codes of the chunk, and of its reverse complement.
    codes: Vec<u8>,
    rc: Vec<u8>,
    /// Protein of the last frame translated.
    pub protein: Vec<u8>,
    /// The chunk as loaded (for DNA spans).
    raw: Vec<u8>,
}

impl Translator {
    /// Prepares `chunk` (DNA, any case) for [`Translator::frame`].
    pub fn load(&mut self, chunk: &[u8], ambiguity: Ambiguity) {
        let lut = match ambiguity {
            Ambiguity::X => &CODES_DEFAULT,
            Ambiguity::Drop => &CODES_COMPAT,
        };
        self.codes.clear();
        self.codes.extend(chunk.iter().map(|&b| lut[b as usize]));
        self.raw.clear();
        self.raw.extend_from_slice(chunk);
        // Complement of code x < 4 is 3 - x; 4 (other) stays 4, as VirNucPro leaves N as N.
        self.rc.clear();
        self.rc.extend(
            self.codes
                .iter()
                .rev()
                .map(|&x| if x < 4 { 3 - x } else { 4 }),
        );
        self.protein.reserve(chunk.len() / 3 + 1);
    }

    /// Translates one frame of the loaded chunk into `self.protein`; stops at the first stop codon.
    /// Returns the outcome and the number of codons with a character other than `ACGT` (read up to
    /// the stop).
    pub fn frame(&mut self, frame: Frame, ambiguity: Ambiguity) -> (FrameOutcome, usize) {
        self.translate(frame, ambiguity, true)
    }

    /// The DNA span of the last frame translated (which must be `frame`, translated whole: a kept
    /// frame), upper-cased, into `out` (cleared first). Bases are written as the translation read
    /// them: `ACGT` (also for lowercase, and `U` in the default mode), every other character
    /// upper-cased and, on the reverse strand, left uncomplemented (VirNucPro's `reverse_complement`).
    pub fn dna_span(&self, frame: Frame, rule: SpanRule, out: &mut Vec<u8>) {
        out.clear();
        let len = self.codes.len();
        let range = rule.range(frame.offset(), self.protein.len(), len);
        let base = |code: u8, raw: u8| {
            if code < 4 {
                b"ACGT"[code as usize]
            } else {
                raw.to_ascii_uppercase()
            }
        };
        if frame.reverse() {
            // Position i of the reverse complement is position len - 1 - i of the chunk.
            out.extend(range.map(|i| base(self.rc[i], self.raw[len - 1 - i])));
        } else {
            out.extend(range.map(|i| base(self.codes[i], self.raw[i])));
        }
    }

    fn translate(
        &mut self,
        frame: Frame,
        ambiguity: Ambiguity,
        stop_early: bool,
    ) -> (FrameOutcome, usize) {
        self.protein.clear();
        let codes = if frame.reverse() {
            &self.rc
        } else {
            &self.codes
        };
        let codes = codes.get(frame.offset()..).unwrap_or_default();
        let mut ambiguous = 0;
        let mut stopped = false;
        for codon in codes.chunks_exact(3) {
            let aa = CODON_LUT
                [usize::from(codon[0]) << 6 | usize::from(codon[1]) << 3 | usize::from(codon[2])];
            if aa == 0 {
                ambiguous += 1;
                if ambiguity == Ambiguity::X {
                    self.protein.push(b'X');
                }
                continue;
            }
            if aa == b'*' {
                stopped = true;
                if stop_early {
                    break;
                }
            }
            self.protein.push(aa);
        }
        let outcome = if stopped {
            FrameOutcome::Stop
        } else if self.protein.is_empty() {
            FrameOutcome::Empty
        } else {
            FrameOutcome::Kept
        };
        (outcome, ambiguous)
    }
}

/// All six frames of `chunk`, full translations (stops included, as `*`), for tests and tools.
pub fn six_frames_full(chunk: &[u8], ambiguity: Ambiguity) -> [Vec<u8>; 6] {
    let mut t = Translator::default();
    t.load(chunk, ambiguity);
    Frame::ALL.map(|f| {
        t.translate(f, ambiguity, false);
        t.protein.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// The standard genetic code written out codon by codon, independently of `CODON_TABLE`.
    fn reference_table() -> HashMap<&'static str, char> {
        let rows = [
            ("TTT", 'F'),
            ("TTC", 'F'),
            ("TTA", 'L'),
            ("TTG", 'L'),
            ("CTT", 'L'),
            ("CTC", 'L'),
            ("CTA", 'L'),
            ("CTG", 'L'),
            ("ATT", 'I'),
            ("ATC", 'I'),
            ("ATA", 'I'),
            ("ATG", 'M'),
            ("GTT", 'V'),
            ("GTC", 'V'),
            ("GTA", 'V'),
            ("GTG", 'V'),
            ("TCT", 'S'),
            ("TCC", 'S'),
            ("TCA", 'S'),
            ("TCG", 'S'),
            ("CCT", 'P'),
            ("CCC", 'P'),
            ("CCA", 'P'),
            ("CCG", 'P'),
            ("ACT", 'T'),
            ("ACC", 'T'),
            ("ACA", 'T'),
            ("ACG", 'T'),
            ("GCT", 'A'),
            ("GCC", 'A'),
            ("GCA", 'A'),
            ("GCG", 'A'),
            ("TAT", 'Y'),
            ("TAC", 'Y'),
            ("TAA", '*'),
            ("TAG", '*'),
            ("CAT", 'H'),
            ("CAC", 'H'),
            ("CAA", 'Q'),
            ("CAG", 'Q'),
            ("AAT", 'N'),
            ("AAC", 'N'),
            ("AAA", 'K'),
            ("AAG", 'K'),
            ("GAT", 'D'),
            ("GAC", 'D'),
            ("GAA", 'E'),
            ("GAG", 'E'),
            ("TGT", 'C'),
            ("TGC", 'C'),
            ("TGA", '*'),
            ("TGG", 'W'),
            ("CGT", 'R'),
            ("CGC", 'R'),
            ("CGA", 'R'),
            ("CGG", 'R'),
            ("AGT", 'S'),
            ("AGC", 'S'),
            ("AGA", 'R'),
            ("AGG", 'R'),
            ("GGT", 'G'),
            ("GGC", 'G'),
            ("GGA", 'G'),
            ("GGG", 'G'),
        ];
        rows.into_iter().collect()
    }

    /// Straightforward string-based six-frame translation, VirNucPro's algorithm spelled out.
    fn reference_six(seq: &str, drop_ambiguous: bool) -> Vec<String> {
        let table = reference_table();
        let up = seq.to_uppercase();
        let rc: String = up
            .chars()
            .rev()
            .map(|c| match c {
                'A' => 'T',
                'T' => 'A',
                'C' => 'G',
                'G' => 'C',
                o => o,
            })
            .collect();
        let mut out = vec![];
        for s in [&up, &rc] {
            let b = s.as_bytes();
            for f in 0..3 {
                let mut p = String::new();
                let mut i = f;
                while i + 3 <= b.len() {
                    let codon = std::str::from_utf8(&b[i..i + 3]).unwrap_or("???");
                    match table.get(codon) {
                        Some(&aa) => p.push(aa),
                        None if !drop_ambiguous => p.push('X'),
                        None => {}
                    }
                    i += 3;
                }
                out.push(p);
            }
        }
        out
    }

    fn kept(seq: &[u8], amb: Ambiguity) -> Vec<(Frame, String)> {
        let mut t = Translator::default();
        t.load(seq, amb);
        let mut out = vec![];
        for f in Frame::ALL {
            if t.frame(f, amb).0 == FrameOutcome::Kept {
                out.push((f, String::from_utf8_lossy(&t.protein).into_owned()));
            }
        }
        out
    }

    #[test]
    fn hand_checked_cases() {
        // ATG GCC TAA: F1 = M A *, dropped. Reverse complement TTAGGCCAT: R1 = L G H.
        let full = six_frames_full(b"ATGGCCTAA", Ambiguity::X);
        assert_eq!(full[0], b"MA*");
        assert_eq!(full[3], b"LGH");
        assert_eq!(full[1], b"WP"); // TGG CCT
        assert_eq!(full[2], b"GL"); // GGC CTA
        assert_eq!(
            kept(b"atggcctaa", Ambiguity::X)[0],
            (Frame::F2, "WP".into())
        );
        // Ambiguous codon in the middle: default X keeps positions, compat drops the residue.
        // ATG NNN GCC: F1 = M X A (default) / M A (VirNucPro).
        assert_eq!(
            kept(b"ATGNNNGCC", Ambiguity::X)[0],
            (Frame::F1, "MXA".into())
        );
        assert_eq!(
            kept(b"ATGNNNGCC", Ambiguity::Drop)[0],
            (Frame::F1, "MA".into())
        );
        // ATGANGCC: F1 = ATG ANG → M X / M; F2 = TGA → stop; F3 = GAN GCC? only GAN then GCC partial.
        let d = kept(b"ATGANGCC", Ambiguity::Drop);
        assert_eq!(d[0], (Frame::F1, "M".into()));
        // All-N chunk: default frames are all X; compat frames are empty → all dropped.
        assert_eq!(kept(b"NNNNNN", Ambiguity::X).len(), 6);
        assert!(kept(b"NNNNNN", Ambiguity::Drop).is_empty());
        // RNA: U is T by default, ambiguous in compat.
        assert_eq!(kept(b"AUG", Ambiguity::X)[0], (Frame::F1, "M".into()));
        // compat: AUG and its reverse complement CUT both hold a non-ACGT base → nothing kept.
        assert!(kept(b"AUG", Ambiguity::Drop).is_empty());
        // Too short for a codon: every frame empty.
        assert!(kept(b"AC", Ambiguity::X).is_empty());
    }

    /// VirNucPro's DNA span of each kept frame (`identify_seq`), string-based: upper-case, reverse
    /// complement of `ACGT` only, `s[n-1 : n + 3·len(protein)]` with Python's capping slice.
    fn reference_spans(seq: &str) -> Vec<(Frame, String)> {
        let up = seq.to_ascii_uppercase();
        let rc: String = up
            .chars()
            .rev()
            .map(|c| match c {
                'A' => 'T',
                'T' => 'A',
                'C' => 'G',
                'G' => 'C',
                o => o,
            })
            .collect();
        let proteins = reference_six(&up, true);
        let mut out = vec![];
        for (k, (frame, protein)) in Frame::ALL.iter().zip(&proteins).enumerate() {
            if protein.contains('*') || protein.is_empty() {
                continue;
            }
            let strand = if k < 3 { &up } else { &rc };
            let n = k % 3 + 1;
            let end = (n + 3 * protein.len()).min(strand.len());
            let start = (n - 1).min(end);
            out.push((*frame, strand[start..end].to_string()));
        }
        out
    }

    fn spans(seq: &[u8], amb: Ambiguity, rule: SpanRule) -> Vec<(Frame, String)> {
        let mut t = Translator::default();
        t.load(seq, amb);
        let mut out = vec![];
        let mut dna = vec![];
        for f in Frame::ALL {
            if t.frame(f, amb).0 == FrameOutcome::Kept {
                t.dna_span(f, rule, &mut dna);
                out.push((f, String::from_utf8_lossy(&dna).into_owned()));
            }
        }
        out
    }

    #[test]
    fn dna_span_hand_checked_cases() {
        // ATGGCCAAAG: F1 = ATG GCC AAA (M A K), span = one base more: ATGGCCAAAG (10 bases);
        // F2 = TGG CCA AAG (W P K): span TGGCCAAAG capped at the end (9 bases).
        let s = spans(b"atggccaaag", Ambiguity::Drop, SpanRule::VirNucPro);
        assert_eq!(s[0], (Frame::F1, "ATGGCCAAAG".into()));
        assert_eq!(s[1], (Frame::F2, "TGGCCAAAG".into()));
        let s = spans(b"atggccaaag", Ambiguity::X, SpanRule::Coded);
        assert_eq!(s[0], (Frame::F1, "ATGGCCAAA".into()));
        // ATG NNN GCC A: VirNucPro drops NNN, so aa_len = 2 and F1's span is ATGNNNG (3·2 + 1 bases):
        // shorter than the coded region and ending inside it. The default keeps all three codons.
        let s = spans(b"ATGNNNGCCA", Ambiguity::Drop, SpanRule::VirNucPro);
        assert_eq!(s[0], (Frame::F1, "ATGNNNG".into()));
        let s = spans(b"ATGNNNGCCA", Ambiguity::X, SpanRule::Coded);
        assert_eq!(s[0], (Frame::F1, "ATGNNNGCC".into()));
        // Reverse frames read the reverse complement; N stays N, U is T in the default only.
        // GCCAAAGUU in compat: the reverse complement is UUCTTTGGC (U left as it is); R1 = UUC
        // (dropped) TTT GGC → "FG", so its span is 3·2 + 1 = 7 bases from 0: UUCTTTG — the dropped
        // codon in, the last codon half out.
        let s = spans(b"GCCAAAGUU", Ambiguity::Drop, SpanRule::VirNucPro);
        assert_eq!(s[3], (Frame::R1, "UUCTTTG".into()));
        let s = spans(b"GCCAAAGTT", Ambiguity::X, SpanRule::Coded);
        let r1 = s.iter().find(|(f, _)| *f == Frame::R1).expect("R1 kept");
        assert_eq!(r1.1, "AACTTTGGC");
        let s = spans(b"GCCAAAGUU", Ambiguity::X, SpanRule::Coded);
        assert_eq!(
            s.iter()
                .find(|(f, _)| *f == Frame::R1)
                .map(|x| x.1.as_str()),
            Some("AACTTTGGC")
        );
    }

    proptest! {
        #[test]
        fn compat_dna_spans_match_virnucpro_reference(seq in "[ACGTNacgtnRYKMSWBDHVU]{0,120}") {
            let ours = spans(seq.as_bytes(), Ambiguity::Drop, SpanRule::VirNucPro);
            prop_assert_eq!(ours, reference_spans(&seq));
        }

        #[test]
        fn default_dna_spans_are_the_coded_bases(seq in "[ACGTNacgtRY]{0,120}") {
            let mut t = Translator::default();
            t.load(seq.as_bytes(), Ambiguity::X);
            let up = seq.to_ascii_uppercase();
            let mut dna = vec![];
            for f in Frame::ALL {
                if t.frame(f, Ambiguity::X).0 != FrameOutcome::Kept {
                    continue;
                }
                t.dna_span(f, SpanRule::Coded, &mut dna);
                prop_assert_eq!(dna.len(), 3 * t.protein.len());
                // Translating the span again gives the frame's protein: the span is its codons.
                let again = six_frames_full(&dna, Ambiguity::X)[0].clone();
                prop_assert_eq!(&again, &t.protein);
                if !f.reverse() {
                    prop_assert_eq!(&dna[..], &up.as_bytes()[f.offset()..f.offset() + dna.len()]);
                }
            }
        }

        #[test]
        fn six_frames_match_reference(seq in "[ACGTNacgtRY]{0,200}") {
            for (amb, drop) in [(Ambiguity::X, false), (Ambiguity::Drop, true)] {
                let ours: Vec<String> = six_frames_full(seq.as_bytes(), amb)
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                let reference = reference_six(&seq, drop);
                prop_assert_eq!(&ours, &reference);
                // The early-exit path keeps exactly the stop-free, non-empty frames.
                let k = kept(seq.as_bytes(), amb);
                let expect: Vec<(Frame, String)> = Frame::ALL
                    .iter()
                    .zip(&reference)
                    .filter(|(_, p)| !p.is_empty() && !p.contains('*'))
                    .map(|(f, p)| (*f, p.clone()))
                    .collect();
                prop_assert_eq!(k, expect);
            }
        }
    }
}
