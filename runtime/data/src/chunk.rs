//! VirNucPro's chunking of a nucleotide sequence into fixed-length, slightly overlapping chunks.
//!
//! Our reading of VirNucPro (`units.py`, `split_fasta_chunk`, Li-Jing-1997/VirNucPro), restated as
//! arithmetic (no code copied):
//!
//! * every record, whatever its length, becomes `n = ceil(L / c)` chunks named `<id>_chunk_<k>` with
//!   `k` from **1**; a record no longer than `c` is one chunk `<id>_chunk_1` holding the whole record;
//! * the shortfall `r = n·c − L` (0 ≤ r < c) is spread as overlap between consecutive chunks: with
//!   `q = floor(r / n)` and `u = r − q·(n − 1)`, the first `u` gaps overlap by `q + 1` and the others
//!   by `q`; chunk `k` (0-based) starts at `k·c − Σ_{j<k} step_j` and is `c` long, clipped at the end
//!   of the sequence (Python slicing);
//! * when `u ≥ n`, which happens for small `n` (e.g. `L = 997, c = 500`: `n = 2, r = 3, q = 1,
//!   u = 2`), every gap overlaps by `q + 1` and the overlaps no longer add up to `r`: the last chunk then
//!   ends at `L` but starts later than `L − c`, so it is **shorter** than `c` (`[498, 997)` in the
//!   example). We reproduce this exactly, because the embeddings must match VirNucPro's;
//! * an empty record (L = 0) makes VirNucPro divide by zero; we skip it and count it instead.

use std::ops::Range;

/// The chunks of a sequence of length `len` cut at `chunk_len`, as `(k, range)` with `k` from 1.
///
/// ```
/// let chunks: Vec<_> = virnuc_data::chunk::chunks(1200, 500).collect();
/// // n = 3, r = 300, q = 100, u = 100 → both gaps overlap by 100 or 101 (u ≥ n: all 101)
/// assert_eq!(chunks, vec![(1, 0..500), (2, 399..899), (3, 798..1200)]);
/// ```
pub fn chunks(len: usize, chunk_len: usize) -> Chunks {
    assert!(chunk_len > 1, "chunk length must be at least 2");
    let n = len.div_ceil(chunk_len);
    let r = n * chunk_len - len;
    let q = r.checked_div(n).unwrap_or(0);
    // u may exceed n - 1; VirNucPro's list of steps is then all `q + 1` (see module docs).
    let u = if n == 0 { 0 } else { r - q * (n - 1) };
    Chunks {
        len,
        chunk_len,
        n,
        q,
        u,
        k: 0,
        moved: 0,
    }
}

/// Number of chunks of a sequence of length `len`: `ceil(len / chunk_len)`.
pub fn chunk_count(len: usize, chunk_len: usize) -> usize {
    len.div_ceil(chunk_len)
}

/// Iterator returned by [`chunks`].
#[derive(Debug, Clone)]
pub struct Chunks {
    len: usize,
    chunk_len: usize,
    n: usize,
    q: usize,
    u: usize,
    k: usize,
    /// Sum of the overlap steps of the gaps before chunk `k`.
    moved: usize,
}

impl Iterator for Chunks {
    type Item = (usize, Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.k >= self.n {
            return None;
        }
        let start = self.k * self.chunk_len - self.moved;
        let end = (start + self.chunk_len).min(self.len);
        let step = if self.k < self.u { self.q + 1 } else { self.q };
        self.moved += step;
        self.k += 1;
        Some((self.k, start..end))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.n - self.k;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Chunks {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A literal transcription of VirNucPro's list-building steps, as a second code path.
    fn reference(len: usize, c: usize) -> Vec<(usize, Range<usize>)> {
        let n = len.div_ceil(c);
        if n == 0 {
            return vec![];
        }
        let total = n * c;
        let repeat = total - len;
        let lower = repeat / n; // int(repeat / n) for non-negative values
        let upper = lower + 1;
        let need_up = repeat as i64 - (lower * (n - 1)) as i64;
        let mut steps: Vec<usize> = Vec::new();
        for _ in 0..need_up.max(0) {
            steps.push(upper);
        }
        for _ in 0..(n as i64 - 1 - need_up).max(0) {
            steps.push(lower);
        }
        steps.push(0);
        let mut out = vec![];
        let mut move_step = 0;
        for (a, b) in (0..len).step_by(c).zip(steps) {
            let start = if a > 1 { a - move_step } else { a };
            out.push((a / c + 1, start..(start + c).min(len)));
            move_step += b;
        }
        out
    }

    #[test]
    fn lambda_genome_500_and_300() {
        // 48,502 bp: n = ceil(48502/500) = 98, r = 498, q = 5, u = 13 → 13 gaps of 6, 84 of 5.
        let c: Vec<_> = chunks(48_502, 500).collect();
        assert_eq!(c.len(), 98);
        assert_eq!(c[1].1, 494..994);
        assert_eq!(c[13].1.start, 13 * 500 - 13 * 6);
        assert_eq!(c[14].1.start, 14 * 500 - 13 * 6 - 5);
        assert_eq!(c[97].1, 48_002..48_502);
        assert!(c.iter().all(|(_, r)| r.len() == 500));
        // 300 bp: n = 162, r = 98, q = 0, u = 98 → 98 gaps of 1, 63 of 0.
        let c: Vec<_> = chunks(48_502, 300).collect();
        assert_eq!(c.len(), 162);
        assert_eq!(c[161].1, 48_202..48_502);
        assert_eq!(c[98].1.start, 98 * 300 - 98);
        assert_eq!(c[99].1.start, 99 * 300 - 98);
    }

    #[test]
    fn short_last_chunk_quirk_is_reproduced() {
        assert_eq!(
            chunks(997, 500).collect::<Vec<_>>(),
            vec![(1, 0..500), (2, 498..997)]
        );
        assert_eq!(chunks(10, 500).collect::<Vec<_>>(), vec![(1, 0..10)]);
        assert_eq!(chunks(0, 500).count(), 0);
        assert_eq!(
            chunks(1000, 500).collect::<Vec<_>>(),
            vec![(1, 0..500), (2, 500..1000)]
        );
    }

    proptest! {
        #[test]
        fn matches_reference_and_covers(len in 0usize..20_000, c in prop::sample::select(vec![2usize, 3, 7, 300, 500])) {
            let got: Vec<_> = chunks(len, c).collect();
            prop_assert_eq!(&got, &reference(len, c));
            prop_assert_eq!(got.len(), chunk_count(len, c));
            if len > 0 {
                prop_assert_eq!(got[0].1.start, 0);
                prop_assert_eq!(got.last().map(|x| x.1.end), Some(len));
                for w in got.windows(2) {
                    // contiguous or overlapping, never a gap, never going backwards
                    prop_assert!(w[1].1.start <= w[0].1.end && w[1].1.start > w[0].1.start);
                }
                for (_, r) in &got {
                    prop_assert!(r.len() <= c && !r.is_empty());
                }
            }
        }
    }
}
