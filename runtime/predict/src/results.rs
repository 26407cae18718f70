//! VirNucPro's two result files and the per-record verdicts it lacks, as pure functions.
//!
//! Our reading of VirNucPro's `prediction.py` (`make_predictdata`, `determine_virus`), restated:
//!
//! * `prediction_results.txt`: header `Sequence_ID\tPrediction\tscore1\tscore2`, then one line per
//!   kept frame, `id\tlabel\tP(others)\tP(virus)`, scores as `str()` of numpy float32
//!   ([`crate::numpy_str`]), label by [`crate::classifier::label`]. Written with plain f-strings: no
//!   quoting.
//! * `prediction_results_highestscore.csv` (tab-separated): the first file read back by pandas,
//!   `Modified_ID = Sequence_ID[:-2]` (the chunk: the frame suffix `F1` … `R3` removed; the last two
//!   *characters*), grouped (`groupby`, keys sorted as strings: `x_chunk_10` before `x_chunk_2`; equal
//!   keys — e.g. from repeated record ids — form one group), `Is_Virus = max(score2) >= max(score1)`
//!   (a tie is `True`; pandas' `max` skips NaN, and a NaN maximum compares `False`), written by
//!   `to_csv(sep="\t", index=False)`: header `Modified_ID\tIs_Virus`, values `True`/`False`, a key
//!   holding `"` quoted with the quote doubled (csv `QUOTE_MINIMAL`; ids hold no tab or newline).
//!   Comparing the float32 scores equals comparing pandas' float64 reading of their shortest
//!   round-trip strings: that reading keeps order and equality.
//! * Per-record verdicts (not in VirNucPro): every input record, with its chunks, kept frames,
//!   viral chunks (VirNucPro's chunk rule above), max and mean P(virus) over its frames; a record
//!   without a stop-free frame, which VirNucPro drops silently, is listed with verdict `no_frames`.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::classifier::label;
use crate::numpy_str::write_float32;

pub const RESULTS_FILE: &str = "prediction_results.txt";
pub const HIGHEST_FILE: &str = "prediction_results_highestscore.csv";
pub const VERDICTS_FILE: &str = "prediction_verdicts.tsv";
pub const RESULTS_HEADER: &str = "Sequence_ID\tPrediction\tscore1\tscore2\n";
pub const HIGHEST_HEADER: &str = "Modified_ID\tIs_Virus\n";
pub const VERDICTS_HEADER: &str = "record_id\tlength\tchunks\tframes\tchunks_with_frames\t\
     viral_chunks\tmax_p_virus\tmean_p_virus\tverdict\n";

/// One line of `prediction_results.txt` (newline included), appended to `out`.
pub fn results_line(out: &mut String, id: &str, p: [f32; 2]) {
    out.push_str(id);
    out.push('\t');
    out.push_str(label(p));
    out.push('\t');
    write_float32(out, p[0]);
    out.push('\t');
    write_float32(out, p[1]);
    out.push('\n');
}

/// `Sequence_ID[:-2]` of Python: all but the last two characters (not bytes).
pub fn modified_id(id: &str) -> &str {
    let mut ends = id.char_indices().rev().map(|(i, _)| i);
    match (ends.next(), ends.next()) {
        (Some(_), Some(i)) => &id[..i],
        _ => "",
    }
}

/// pandas' `max` of a column: NaN skipped, NaN when all are NaN.
fn nanmax(acc: f32, x: f32) -> f32 {
    if acc.is_nan() || x > acc { x } else { acc }
}

/// The per-chunk maxima behind `prediction_results_highestscore.csv`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HighestScore {
    groups: BTreeMap<String, [f32; 2]>,
}

impl HighestScore {
    /// Adds one frame (`Sequence_ID`, `[score1, score2]`).
    pub fn add(&mut self, sequence_id: &str, p: [f32; 2]) {
        let key = modified_id(sequence_id);
        match self.groups.get_mut(key) {
            Some(m) => {
                m[0] = nanmax(m[0], p[0]);
                m[1] = nanmax(m[1], p[1]);
            }
            None => {
                self.groups.insert(key.to_string(), p);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// `(Modified_ID, Is_Virus)` in pandas' order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, bool)> {
        self.groups
            .iter()
            .map(|(k, m)| (k.as_str(), chunk_is_virus(m[0], m[1])))
    }

    /// The whole file, header included.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(HIGHEST_HEADER.as_bytes())?;
        let mut line = String::new();
        for (key, virus) in self.rows() {
            line.clear();
            csv_field(&mut line, key);
            line.push('\t');
            line.push_str(if virus { "True" } else { "False" });
            line.push('\n');
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

/// VirNucPro's chunk rule `max(score2) >= max(score1)` (NaN compares false).
pub fn chunk_is_virus(max1: f32, max2: f32) -> bool {
    max2 >= max1
}

/// A field as Python's csv writer (`QUOTE_MINIMAL`, tab delimiter) writes it.
fn csv_field(out: &mut String, field: &str) {
    if field.contains(['"', '\t', '\n', '\r']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// One input record, as the verdicts need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub id: String,
    /// Bases.
    pub length: u64,
    pub chunks: u64,
    /// Kept (stop-free) frames: the record's consecutive rows of `prediction_results.txt`.
    pub frames: u64,
}

/// One line of `prediction_verdicts.tsv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub id: String,
    pub length: u64,
    pub chunks: u64,
    pub frames: u64,
    pub chunks_with_frames: u64,
    pub viral_chunks: u64,
    /// NaN without frames.
    pub max_p_virus: f32,
    pub mean_p_virus: f32,
}

impl Verdict {
    /// `virus` when a chunk is viral by VirNucPro's rule, `others` when none is, `no_frames` when
    /// no chunk had a stop-free frame.
    pub fn call(&self) -> &'static str {
        if self.frames == 0 {
            "no_frames"
        } else if self.viral_chunks > 0 {
            "virus"
        } else {
            "others"
        }
    }

    /// The TSV line, newline included; probabilities as numpy float32 `str()` (empty without frames).
    pub fn line(&self) -> String {
        let mut s = format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t",
            self.id,
            self.length,
            self.chunks,
            self.frames,
            self.chunks_with_frames,
            self.viral_chunks
        );
        if self.frames > 0 {
            write_float32(&mut s, self.max_p_virus);
            s.push('\t');
            write_float32(&mut s, self.mean_p_virus);
        } else {
            s.push('\t');
        }
        s.push('\t');
        s.push_str(self.call());
        s.push('\n');
        s
    }
}

/// The verdict of one record from its frames (ids and probabilities, in output order).
pub fn verdict<'a>(
    record: &RecordInfo,
    frames: impl IntoIterator<Item = (&'a str, [f32; 2])>,
) -> Verdict {
    let mut v = Verdict {
        id: record.id.clone(),
        length: record.length,
        chunks: record.chunks,
        frames: 0,
        chunks_with_frames: 0,
        viral_chunks: 0,
        max_p_virus: f32::NAN,
        mean_p_virus: f32::NAN,
    };
    let mut sum = 0f64;
    // Frames of one chunk are consecutive: a chunk ends where the frame's chunk id changes.
    let mut current: Option<(&str, [f32; 2])> = None;
    let close = |chunk: Option<(&str, [f32; 2])>, v: &mut Verdict| {
        if let Some((_, m)) = chunk {
            v.chunks_with_frames += 1;
            v.viral_chunks += u64::from(chunk_is_virus(m[0], m[1]));
        }
    };
    for (id, p) in frames {
        v.frames += 1;
        sum += f64::from(p[1]);
        v.max_p_virus = nanmax(v.max_p_virus, p[1]);
        let chunk = modified_id(id);
        match &mut current {
            Some((c, m)) if *c == chunk => {
                m[0] = nanmax(m[0], p[0]);
                m[1] = nanmax(m[1], p[1]);
            }
            _ => {
                close(current.take(), &mut v);
                current = Some((chunk, p));
            }
        }
    }
    close(current, &mut v);
    if v.frames > 0 {
        v.mean_p_virus = (sum / v.frames as f64) as f32;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_line_as_virnucpro_writes_it() {
        let mut s = String::new();
        results_line(&mut s, "ctg_chunk_1F1", [0.25, 0.75]);
        results_line(&mut s, "ctg_chunk_1R2", [0.999_99, 1e-5]);
        results_line(&mut s, "tie_chunk_1F3", [0.5, 0.5]);
        assert_eq!(
            s,
            "ctg_chunk_1F1\tvirus\t0.25\t0.75\nctg_chunk_1R2\tothers\t0.99999\t1e-05\n\
             tie_chunk_1F3\tothers\t0.5\t0.5\n"
        );
    }

    #[test]
    fn modified_id_drops_two_characters_not_bytes() {
        assert_eq!(modified_id("a_chunk_10R3"), "a_chunk_10");
        assert_eq!(modified_id("é_chunk_1Fé"), "é_chunk_1");
        assert_eq!(modified_id("ab"), "");
        assert_eq!(modified_id("a"), "");
        assert_eq!(modified_id(""), "");
    }

    #[test]
    fn highest_score_groups_sorts_as_strings_and_ties_are_virus() {
        let mut h = HighestScore::default();
        h.add("x_chunk_2F1", [0.9, 0.1]);
        h.add("x_chunk_2R1", [0.4, 0.6]); // max2 0.6 < max1 0.9 → False
        h.add("x_chunk_10F2", [0.5, 0.5]); // tie → True
        h.add("x_chunk_1F1", [0.2, 0.8]);
        h.add("a\"q_chunk_1F1", [0.7, 0.3]);
        h.add("x_chunk_1F1", [0.95, 0.05]); // a repeated record id joins the group: 0.8 < 0.95
        let mut out = Vec::new();
        h.write_to(&mut out).expect("in memory");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "Modified_ID\tIs_Virus\n\"a\"\"q_chunk_1\"\tFalse\nx_chunk_1\tFalse\nx_chunk_10\tTrue\n\
             x_chunk_2\tFalse\n"
        );
    }

    #[test]
    fn nan_scores_follow_pandas() {
        let mut h = HighestScore::default();
        h.add("n_chunk_1F1", [f32::NAN, f32::NAN]);
        h.add("n_chunk_1F2", [0.3, 0.7]);
        h.add("m_chunk_1F1", [f32::NAN, f32::NAN]);
        let rows: Vec<_> = h.rows().collect();
        assert_eq!(rows, [("m_chunk_1", false), ("n_chunk_1", true)]);
    }

    #[test]
    fn verdict_counts_chunks_frames_and_viral_chunks() {
        let rec = RecordInfo {
            id: "r".into(),
            length: 1200,
            chunks: 3,
            frames: 3,
        };
        let frames = [
            ("r_chunk_1F1", [0.2f32, 0.8]),
            ("r_chunk_1R1", [0.3, 0.7]),
            ("r_chunk_3F2", [0.6, 0.4]),
        ];
        let v = verdict(&rec, frames);
        // Maxima are per score over the chunk's frames: 0.8 (F1) ≥ 0.3 (R1), whatever each frame says.
        assert_eq!((v.frames, v.chunks_with_frames, v.viral_chunks), (3, 2, 1));
        assert_eq!(v.max_p_virus, 0.8);
        assert!((v.mean_p_virus - (0.8 + 0.7 + 0.4) / 3.0).abs() < 1e-7);
        assert_eq!(v.call(), "virus");
        assert_eq!(
            v.line(),
            format!(
                "r\t1200\t3\t3\t2\t1\t0.8\t{}\tvirus\n",
                float32_str_mean(&v)
            )
        );
        let none = verdict(
            &RecordInfo {
                id: "e".into(),
                length: 2,
                chunks: 1,
                frames: 0,
            },
            [],
        );
        assert_eq!(none.line(), "e\t2\t1\t0\t0\t0\t\t\tno_frames\n");
    }

    fn float32_str_mean(v: &Verdict) -> String {
        crate::numpy_str::float32_str(v.mean_p_virus)
    }
}
