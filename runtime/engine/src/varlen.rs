//! Attention over packed variable-length sequences: the CPU implementation of
//! `com.virnuc:VarlenAttention` (contract: `plugins/varlen_attention/README.md`), as a pure function.
//!
//! Token `t` of sequence `b` attends only to the tokens `cu_seqlens[b] .. cu_seqlens[b + 1]`; rotary
//! (fair-esm / HF `rotate_half` form) is applied to q and k first when asked. 16-bit inputs are widened
//! to f32, every sum runs in f32 and the result is rounded once at the end. Work is split over
//! sequences × heads with rayon.

use half::{bf16, f16};
use rayon::prelude::*;

/// Element types the op accepts: converted to f32 on load and rounded once on store.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// The op's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct VarlenParams {
    pub num_heads: usize,
    /// Multiplies q·k; `None` means `head_dim ** -0.5`.
    pub scale: Option<f32>,
    pub rotary: bool,
    pub rotary_base: f32,
}

impl VarlenParams {
    pub fn new(num_heads: usize) -> Self {
        Self {
            num_heads,
            scale: None,
            rotary: true,
            rotary_base: 10000.0,
        }
    }
}

/// Inputs that break the op's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VarlenError {
    #[error("VarlenAttention: {0}")]
    Shape(String),
}

fn bad(msg: impl Into<String>) -> VarlenError {
    VarlenError::Shape(msg.into())
}

/// Checks `cu_seqlens` (starts at 0, never decreases, ends at `total_tokens`).
fn check_cu_seqlens(cu_seqlens: &[i32], total_tokens: usize) -> Result<(), VarlenError> {
    if cu_seqlens.first() != Some(&0) {
        return Err(bad("cu_seqlens must start with 0"));
    }
    if cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
        return Err(bad("cu_seqlens must not decrease"));
    }
    let last = cu_seqlens.last().copied().unwrap_or(0);
    if last as i64 != total_tokens as i64 {
        return Err(bad(format!(
            "cu_seqlens ends at {last} but qkv has {total_tokens} tokens"
        )));
    }
    Ok(())
}

/// `inv_freq[i] = base ** (-2i / head_dim)` in f32, as HF `EsmRotaryEmbedding`.
fn inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Applies rotate_half rotary in place to one head vector `x` (length `head_dim`).
#[inline]
fn rotate(x: &mut [f32], position: i64, inv_freq: &[f32]) {
    let half = x.len() / 2;
    let pos = position as f32;
    for i in 0..half {
        let angle = pos * inv_freq[i];
        let (sin, cos) = angle.sin_cos();
        let x1 = x[i];
        let x2 = x[half + i];
        x[i] = x1 * cos - x2 * sin;
        x[half + i] = x2 * cos + x1 * sin;
    }
}

/// Computes `out [total_tokens, num_heads * head_dim]` from `qkv [total_tokens, 3 * num_heads * head_dim]`.
///
/// `position_ids` is required when `params.rotary` (one per token). Every element of `out` is written.
pub fn varlen_attention<T: Element>(
    qkv: &[T],
    cu_seqlens: &[i32],
    position_ids: Option<&[i64]>,
    params: &VarlenParams,
    out: &mut [T],
) -> Result<(), VarlenError> {
    let h = params.num_heads;
    if h == 0 {
        return Err(bad("num_heads must be positive"));
    }
    let total = out.len();
    let total_tokens = match cu_seqlens.last() {
        Some(&t) if t >= 0 => t as usize,
        _ => return Err(bad("cu_seqlens must not be empty")),
    };
    check_cu_seqlens(cu_seqlens, total_tokens)?;
    if total_tokens == 0 {
        return if qkv.is_empty() && out.is_empty() {
            Ok(())
        } else {
            Err(bad("no tokens but non-empty qkv or output"))
        };
    }
    if !qkv.len().is_multiple_of(total_tokens) || !total.is_multiple_of(total_tokens) {
        return Err(bad("qkv / output length is not a multiple of total_tokens"));
    }
    let qkv_cols = qkv.len() / total_tokens;
    if !qkv_cols.is_multiple_of(3 * h) {
        return Err(bad(format!(
            "qkv has {qkv_cols} columns, not a multiple of 3 * num_heads ({h})"
        )));
    }
    let d = qkv_cols / (3 * h);
    let hd = h * d;
    if total != total_tokens * hd {
        return Err(bad(format!(
            "output has {total} elements, expected {total_tokens} x {hd}"
        )));
    }
    let positions = if params.rotary {
        if !d.is_multiple_of(2) {
            return Err(bad(format!("rotary needs an even head_dim, got {d}")));
        }
        match position_ids {
            Some(p) if p.len() == total_tokens => Some(p),
            Some(p) => {
                return Err(bad(format!(
                    "position_ids has {} entries, expected {total_tokens}",
                    p.len()
                )));
            }
            None => return Err(bad("position_ids is required when rotary = 1")),
        }
    } else {
        None
    };
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let freqs = inv_freq(d, params.rotary_base);

    // Each sequence owns a contiguous block of output rows: split the output so that sequences can be
    // processed in parallel without sharing.
    let mut blocks: Vec<(usize, &mut [T])> = Vec::with_capacity(cu_seqlens.len());
    let mut rest = out;
    for w in cu_seqlens.windows(2) {
        let len = (w[1] - w[0]) as usize;
        let (block, tail) = rest.split_at_mut(len * hd);
        blocks.push((w[0] as usize, block));
        rest = tail;
    }

    blocks.into_par_iter().for_each(|(start, block)| {
        let len = block.len() / hd;
        if len == 0 {
            return;
        }
        // One head at a time per task; results gathered, then scattered into the block.
        let heads: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|head| {
                attend_one_head(
                    qkv, qkv_cols, hd, d, head, start, len, positions, &freqs, scale,
                )
            })
            .collect();
        for (head, values) in heads.iter().enumerate() {
            for i in 0..len {
                let dst = &mut block[i * hd + head * d..i * hd + (head + 1) * d];
                for (o, &v) in dst.iter_mut().zip(&values[i * d..(i + 1) * d]) {
                    *o = T::from_f32(v);
                }
            }
        }
    });
    Ok(())
}

/// softmax(scale · q kᵀ) v for one head of one sequence, in f32; returns `[len, d]`.
#[allow(clippy::too_many_arguments)]
fn attend_one_head<T: Element>(
    qkv: &[T],
    qkv_cols: usize,
    hd: usize,
    d: usize,
    head: usize,
    start: usize,
    len: usize,
    positions: Option<&[i64]>,
    freqs: &[f32],
    scale: f32,
) -> Vec<f32> {
    let mut q = vec![0f32; len * d];
    // k transposed to [d, len]: the scores of one query are then axpys over contiguous rows, which
    // vectorize (a dot product per key would be a serial f32 reduction).
    let mut kt = vec![0f32; d * len];
    let mut v = vec![0f32; len * d];
    let mut krow = vec![0f32; d];
    for i in 0..len {
        let row = &qkv[(start + i) * qkv_cols..(start + i + 1) * qkv_cols];
        for j in 0..d {
            q[i * d + j] = row[head * d + j].to_f32();
            krow[j] = row[hd + head * d + j].to_f32();
            v[i * d + j] = row[2 * hd + head * d + j].to_f32();
        }
        if let Some(p) = positions {
            rotate(&mut q[i * d..(i + 1) * d], p[start + i], freqs);
            rotate(&mut krow, p[start + i], freqs);
        }
        for (c, &x) in krow.iter().enumerate() {
            kt[c * len + i] = x;
        }
    }
    let mut out = vec![0f32; len * d];
    // Scores of 4 queries at a time: each key row loaded once feeds 4 accumulators.
    const QB: usize = 4;
    let mut block = vec![0f32; QB * len];
    let mut i0 = 0;
    while i0 < len {
        let nq = QB.min(len - i0);
        block.fill(0.0);
        {
            let (b0, rest) = block.split_at_mut(len);
            let (b1, rest) = rest.split_at_mut(len);
            let (b2, b3) = rest.split_at_mut(len);
            let qv = |r: usize, c: usize| if r < nq { q[(i0 + r) * d + c] } else { 0.0 };
            for c in 0..d {
                let kc = &kt[c * len..(c + 1) * len];
                let (q0, q1, q2, q3) = (qv(0, c), qv(1, c), qv(2, c), qv(3, c));
                for ((((&k, s0), s1), s2), s3) in kc
                    .iter()
                    .zip(b0.iter_mut())
                    .zip(b1.iter_mut())
                    .zip(b2.iter_mut())
                    .zip(b3.iter_mut())
                {
                    *s0 += q0 * k;
                    *s1 += q1 * k;
                    *s2 += q2 * k;
                    *s3 += q3 * k;
                }
            }
        }
        for r in 0..nq {
            let i = i0 + r;
            let scores = &mut block[r * len..(r + 1) * len];
            let mut max = f32::NEG_INFINITY;
            for s in scores.iter_mut() {
                *s *= scale;
                max = max.max(*s);
            }
            let mut denom = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            let oi = &mut out[i * d..(i + 1) * d];
            for (j, &p) in scores.iter().enumerate() {
                let vj = &v[j * d..(j + 1) * d];
                for (o, &x) in oi.iter_mut().zip(vj) {
                    *o += p * x;
                }
            }
            let inv = 1.0 / denom;
            for o in oi.iter_mut() {
                *o *= inv;
            }
        }
        i0 += QB;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent float64 reference: straightforward loops, rotary computed in f64.
    fn reference(
        qkv: &[f64],
        cu: &[i32],
        pos: &[i64],
        h: usize,
        d: usize,
        rotary: bool,
        base: f64,
    ) -> Vec<f64> {
        let hd = h * d;
        let cols = 3 * hd;
        let total = *cu.last().expect("non-empty") as usize;
        let mut out = vec![0f64; total * hd];
        let rot = |x: &[f64], p: i64| -> Vec<f64> {
            if !rotary {
                return x.to_vec();
            }
            let half = d / 2;
            let mut y = x.to_vec();
            for i in 0..half {
                let f = 1.0 / base.powf((2 * i) as f64 / d as f64);
                let a = p as f64 * f;
                y[i] = x[i] * a.cos() - x[half + i] * a.sin();
                y[half + i] = x[half + i] * a.cos() + x[i] * a.sin();
            }
            y
        };
        for w in cu.windows(2) {
            let (s, e) = (w[0] as usize, w[1] as usize);
            for head in 0..h {
                for i in s..e {
                    let q = rot(&qkv[i * cols + head * d..i * cols + head * d + d], pos[i]);
                    let mut sc = Vec::new();
                    for j in s..e {
                        let k = rot(
                            &qkv[j * cols + hd + head * d..j * cols + hd + head * d + d],
                            pos[j],
                        );
                        let dot: f64 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
                        sc.push(dot / (d as f64).sqrt());
                    }
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    for (jj, j) in (s..e).enumerate() {
                        for c in 0..d {
                            out[i * hd + head * d + c] +=
                                ex[jj] / z * qkv[j * cols + 2 * hd + head * d + c];
                        }
                    }
                }
            }
        }
        out
    }

    /// Small deterministic generator so the tests need no extra crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    fn case(lengths: &[usize], h: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<i32>, Vec<i64>) {
        let mut rng = Lcg(seed);
        let mut cu = vec![0i32];
        let mut pos = Vec::new();
        for &l in lengths {
            cu.push(cu.last().copied().unwrap_or(0) + l as i32);
            pos.extend(0..l as i64);
        }
        let total = *cu.last().unwrap_or(&0) as usize;
        // Scaled so that the softmax is not flat (a flat softmax would hide rotary and masking bugs).
        let qkv = (0..total * 3 * h * d).map(|_| rng.next() * 2.0).collect();
        (qkv, cu, pos)
    }

    fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
        let norm = want.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-30);
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / norm)
            .fold(0.0, f64::max)
    }

    fn run_f32(qkv: &[f64], cu: &[i32], pos: &[i64], h: usize, d: usize, rotary: bool) -> Vec<f64> {
        let q32: Vec<f32> = qkv.iter().map(|&x| x as f32).collect();
        let total = *cu.last().unwrap_or(&0) as usize;
        // Poisoned: any element the op forgets to write shows up as NaN.
        let mut out = vec![f32::NAN; total * h * d];
        let params = VarlenParams {
            rotary,
            ..VarlenParams::new(h)
        };
        varlen_attention(&q32, cu, Some(pos), &params, &mut out).expect("valid inputs");
        out.iter().map(|&x| f64::from(x)).collect()
    }

    #[test]
    fn matches_float64_reference_on_mixed_shapes() {
        let shapes: &[(&[usize], usize, usize)] = &[
            (&[1], 1, 2),
            (&[1, 5, 1, 17], 2, 16),
            (&[3, 0, 40], 4, 8),
            (&[64, 1, 33], 20, 16),
            (&[12, 7], 3, 64),
            (&[9], 2, 24),
        ];
        for (i, &(lengths, h, d)) in shapes.iter().enumerate() {
            for rotary in [true, false] {
                let (qkv, cu, pos) = case(lengths, h, d, i as u64 + 1);
                let got = run_f32(&qkv, &cu, &pos, h, d, rotary);
                assert!(got.iter().all(|x| x.is_finite()), "unwritten output");
                let want = reference(&qkv, &cu, &pos, h, d, rotary, 10000.0);
                let err = max_rel_err(&got, &want);
                assert!(
                    err <= 1e-5,
                    "{lengths:?} h={h} d={d} rotary={rotary}: {err}"
                );
            }
        }
    }

    #[test]
    fn fp16_and_bf16_accumulate_in_f32() {
        let (qkv, cu, pos) = case(&[20, 1, 50], 4, 32, 7);
        let want = reference(&qkv, &cu, &pos, 4, 32, true, 10000.0);
        // Reference on the same rounded inputs, so only the computation's error is measured.
        let q16: Vec<f16> = qkv.iter().map(|&x| f16::from_f64(x)).collect();
        let rounded: Vec<f64> = q16.iter().map(|x| x.to_f64()).collect();
        let want16 = reference(&rounded, &cu, &pos, 4, 32, true, 10000.0);
        let mut out = vec![f16::NAN; want.len()];
        varlen_attention(&q16, &cu, Some(&pos), &VarlenParams::new(4), &mut out)
            .expect("valid inputs");
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        assert!(max_rel_err(&got, &want16) <= 2e-3);

        let qb: Vec<bf16> = qkv.iter().map(|&x| bf16::from_f64(x)).collect();
        let rounded: Vec<f64> = qb.iter().map(|x| x.to_f64()).collect();
        let want_b = reference(&rounded, &cu, &pos, 4, 32, true, 10000.0);
        let mut out = vec![bf16::NAN; want.len()];
        varlen_attention(&qb, &cu, Some(&pos), &VarlenParams::new(4), &mut out)
            .expect("valid inputs");
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        // bf16 has 8 bits of mantissa: one final rounding is ~4e-3 relative.
        assert!(max_rel_err(&got, &want_b) <= 8e-3);
    }

    #[test]
    fn the_check_can_fail_when_sequences_leak_or_rotary_is_skipped() {
        let (qkv, cu, pos) = case(&[6, 9], 2, 8, 3);
        let want = reference(&qkv, &cu, &pos, 2, 8, true, 10000.0);
        // One sequence of 15 tokens: attention crosses the boundary.
        let merged = run_f32(&qkv, &[0, 15], &pos, 2, 8, true);
        assert!(max_rel_err(&merged, &want) > 1e-3);
        // Rotary left out (every position 0). Positions running on across sequences would not be
        // caught here: rotary scores depend only on position differences within a sequence.
        let zeros = vec![0i64; 15];
        let got = run_f32(&qkv, &cu, &zeros, 2, 8, true);
        assert!(max_rel_err(&got, &want) > 1e-3);
    }

    #[test]
    fn rejects_inputs_that_break_the_contract() {
        let p = VarlenParams::new(2);
        let qkv = vec![0f32; 4 * 3 * 2 * 4];
        let mut out = vec![0f32; 4 * 2 * 4];
        let pos = [0i64, 1, 0, 1];
        assert!(varlen_attention(&qkv, &[0, 2, 4], Some(&pos), &p, &mut out).is_ok());
        assert!(varlen_attention(&qkv, &[1, 2, 4], Some(&pos), &p, &mut out).is_err());
        assert!(varlen_attention(&qkv, &[0, 3, 2, 4], Some(&pos), &p, &mut out).is_err());
        assert!(varlen_attention(&qkv, &[0, 2, 5], Some(&pos), &p, &mut out).is_err());
        assert!(varlen_attention(&qkv, &[0, 2, 4], None, &p, &mut out).is_err());
        assert!(varlen_attention(&qkv, &[0, 2, 4], Some(&pos[..3]), &p, &mut out).is_err());
        let mut short = vec![0f32; 3];
        assert!(varlen_attention(&qkv, &[0, 2, 4], Some(&pos), &p, &mut short).is_err());
        let p3 = VarlenParams::new(3);
        assert!(varlen_attention(&qkv, &[0, 2, 4], Some(&pos), &p3, &mut out).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_shapes_match_reference(
            lengths in proptest::collection::vec(0usize..24, 1..6),
            h in 1usize..5,
            half_d in 1usize..9,
            seed in any::<u64>(),
            rotary in any::<bool>(),
        ) {
            let d = half_d * 2;
            let (qkv, cu, pos) = case(&lengths, h, d, seed);
            let got = run_f32(&qkv, &cu, &pos, h, d, rotary);
            let want = reference(&qkv, &cu, &pos, h, d, rotary, 10000.0);
            prop_assert!(got.iter().all(|x| x.is_finite()));
            prop_assert!(max_rel_err(&got, &want) <= 1e-5);
        }
    }
}
