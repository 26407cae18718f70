//! Attention over packed variable-length sequences: the CPU implementation of
//! `com.virnuc:VarlenAttention` (contract: `plugins/varlen_attention/README.md`), as a pure function.
//!
//! Token `t` of sequence `b` attends only to the tokens `cu_seqlens[b] .. cu_seqlens[b + 1]`. Positions
//! enter in one of two ways (contract version 2): rotary (fair-esm / HF `rotate_half` form) applied
//! to q and k first, or ALiBi, a per-head linear bias `−slope_h · |i − j|` on the scores, `i` and `j`
//! the tokens' offsets within their sequence (MosaicBERT / DNABERT-S). 16-bit inputs are widened to
//! f32, every sum runs in f32 and the result is rounded once at the end. Work is split over
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
    /// ALiBi slopes, one per head (`alibi_slopes`); `None` or empty: no ALiBi. Excludes rotary.
    pub alibi_slopes: Option<Vec<f32>>,
}

impl VarlenParams {
    /// Rotary on (ESM-2), default scale, no ALiBi: the version-1 defaults.
    pub fn new(num_heads: usize) -> Self {
        Self {
            num_heads,
            scale: None,
            rotary: true,
            rotary_base: 10000.0,
            alibi_slopes: None,
        }
    }

    /// ALiBi with `slopes` (one per head), rotary off, default scale.
    pub fn alibi(slopes: Vec<f32>) -> Self {
        Self {
            num_heads: slopes.len(),
            rotary: false,
            alibi_slopes: Some(slopes),
            ..Self::new(0)
        }
    }

    /// The slopes when ALiBi is on (an empty list means off, as an absent attribute).
    pub fn alibi_slopes(&self) -> Option<&[f32]> {
        self.alibi_slopes.as_deref().filter(|s| !s.is_empty())
    }

    /// The rules on the attributes alone (shapes are checked per call): `num_heads` > 0, and with
    /// ALiBi rotary off, one finite slope per head.
    pub fn check(&self) -> Result<(), VarlenError> {
        let h = self.num_heads;
        if h == 0 {
            return Err(bad("num_heads must be positive"));
        }
        if let Some(slopes) = self.alibi_slopes() {
            if self.rotary {
                return Err(bad(
                    "alibi_slopes needs rotary = 0 (rotary and ALiBi exclude each other)",
                ));
            }
            if slopes.len() != h {
                return Err(bad(format!(
                    "alibi_slopes has {} entries, expected num_heads ({h})",
                    slopes.len()
                )));
            }
            if let Some(s) = slopes.iter().find(|s| !s.is_finite()) {
                return Err(bad(format!("alibi_slopes must be finite, got {s}")));
            }
        }
        Ok(())
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

/// cos and sin of every rotary angle of one sequence, `[len, head_dim / 2]` each: they depend on
/// the position and the frequency only, so all heads share them (one `sin_cos` per token and
/// frequency instead of one per head as well).
struct RotaryTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RotaryTable {
    fn new(positions: &[i64], inv_freq: &[f32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &position in positions {
            let pos = position as f32;
            for &f in inv_freq {
                // The angle as HF computes it: a float32 product of position and frequency.
                let (s, c) = (pos * f).sin_cos();
                sin.push(s);
                cos.push(c);
            }
        }
        Self { cos, sin }
    }

    /// Applies rotate_half rotary in place to the head vector `x` of the sequence's token `i`.
    #[inline(always)]
    fn rotate(&self, x: &mut [f32], i: usize) {
        let half = x.len() / 2;
        let cos = &self.cos[i * half..(i + 1) * half];
        let sin = &self.sin[i * half..(i + 1) * half];
        let (x1s, x2s) = x.split_at_mut(half);
        for (((x1, x2), &c), &s) in x1s.iter_mut().zip(x2s.iter_mut()).zip(cos).zip(sin) {
            let (a, b) = (*x1, *x2);
            *x1 = a * c - b * s;
            *x2 = b * c + a * s;
        }
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
    params.check()?;
    let h = params.num_heads;
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
    if d == 0 {
        return Err(bad(format!(
            "qkv has {qkv_cols} columns for {total_tokens} tokens: head_dim would be 0"
        )));
    }
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
    let alibi = params.alibi_slopes();
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
        let table = positions.map(|p| RotaryTable::new(&p[start..start + len], &freqs));
        let sequence = Sequence {
            rows: &qkv[start * qkv_cols..(start + len) * qkv_cols],
            len,
            head_dim: d,
            rotary: table.as_ref(),
            alibi,
            scale,
        };
        // One head at a time per task; results gathered, then scattered into the block.
        let heads: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|head| attend_one_head(&sequence, head))
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

/// Lanes of the partial reductions below: independent accumulators let the compiler keep them in
/// vector registers (one serial f32 chain cannot be vectorized without reassociation).
const LANES: usize = 8;

/// Largest element (NaN if any element is NaN, as a serial fold with `>` would not guarantee).
#[inline(always)]
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            // `x > a` is false for NaN: keep NaN visible through `a != a` below.
            *a = if x > *a || x.is_nan() { x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(chunks.remainder()) {
        m = if x > m || x.is_nan() { x } else { m };
    }
    m
}

/// `xs[j] -= bias[j]`, returning the largest result (NaN if any is NaN), in one pass.
#[inline(always)]
fn subtract_and_max(xs: &mut [f32], bias: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    let mut bias_chunks = bias.chunks_exact(LANES);
    for (c, b) in (&mut chunks).zip(&mut bias_chunks) {
        for ((a, x), &y) in acc.iter_mut().zip(c.iter_mut()).zip(b) {
            *x -= y;
            *a = if *x > *a || x.is_nan() { *x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for (x, &y) in chunks
        .into_remainder()
        .iter_mut()
        .zip(bias_chunks.remainder())
    {
        *x -= y;
        m = if *x > m || x.is_nan() { *x } else { m };
    }
    for &a in &acc {
        m = if a > m || a.is_nan() { a } else { m };
    }
    m
}

/// Sum in `LANES` partial sums (a different rounding order than a serial sum; both are f32
/// accumulations of positive terms, within the op's 1e-5 contract against float64).
#[inline(always)]
fn sum_f32(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// e^x for the softmax's x = score − max ≤ 0, in straight-line arithmetic that vectorizes: libm's
/// `expf` is a call per element and took most of this op's time at ESM-2's small head dims.
/// Cody–Waite reduction x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two so that n·LN2_HI is
/// exact), e^r by a degree-6 polynomial fitted to e^r on that interval (weighted least squares on
/// Chebyshev nodes), 2^n built in the exponent bits. Relative error ≤ 1.1e-7 on [−87.3, 0]
/// (`fast_exp_matches_float64` checks it). Below −87.3, e^x < 1.2e-38 is held at e^−87.3, a
/// softmax weight 38 orders of magnitude under the maximum's 1. NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding then subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const C: [f32; 7] = [
        1.0,
        1.0,
        0.499_999_73,
        0.166_664_76,
        0.041_673_36,
        0.008_370_537,
        0.001_351_681_3,
    ];
    let x = if x < -87.3 { -87.3 } else { x };
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = C[0] + r * (C[1] + r * (C[2] + r * (C[3] + r * (C[4] + r * (C[5] + r * C[6])))));
    // n ∈ [−126, 0] here, so 2^n is a normal number; a NaN x gives n = 0 and a NaN p.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// One sequence of a pack, as the per-head attention reads it.
struct Sequence<'a, T> {
    /// The sequence's `len` rows of `qkv`, `3 · num_heads · head_dim` values each.
    rows: &'a [T],
    len: usize,
    head_dim: usize,
    rotary: Option<&'a RotaryTable>,
    /// ALiBi slopes of all heads (rotary is then off).
    alibi: Option<&'a [f32]>,
    scale: f32,
}

// Manual impls: a derive would require `T: Clone` for what is only a borrow of `[T]`.
impl<T> Clone for Sequence<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Sequence<'_, T> {}

/// softmax(scale · q kᵀ − bias) v for one head of one sequence, in f32; returns `[len, d]`
/// (`bias[i][j] = slope · |i − j|` with ALiBi, else 0).
///
/// The two matrix products run in matrixmultiply's GEMM, which picks its own SIMD kernel at run
/// time. The loops around them (gathering q/k/v with rotary, the softmax) are written to vectorize;
/// on x86-64 CPUs with AVX2 and FMA (checked at run time, as the release binary targets baseline
/// x86-64) they are compiled a second time with those instructions, 8 lanes instead of SSE2's 4.
/// Both copies do the same operations in the same order per element (no fused multiply-adds are
/// formed: Rust does not contract `a * b + c`, and the GEMM is the same code in both), so they give
/// identical results.
fn attend_one_head<T: Element>(sequence: &Sequence<'_, T>, head: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, the features `attend_one_head_avx2` is compiled for.
        return unsafe { attend_one_head_avx2(sequence, head) };
    }
    attend_one_head_body(sequence, head)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_one_head_avx2<T: Element>(sequence: &Sequence<'_, T>, head: usize) -> Vec<f32> {
    attend_one_head_body(sequence, head)
}

/// Query rows per block: a block's scores (`QUERY_BLOCK × len` f32, 256 KiB at the longest ESM-2
/// sequence) stay in L2 between the two matrix products that read them.
const QUERY_BLOCK: usize = 64;

#[inline(always)]
fn attend_one_head_body<T: Element>(sequence: &Sequence<'_, T>, head: usize) -> Vec<f32> {
    let Sequence {
        rows,
        len,
        head_dim: d,
        rotary,
        alibi,
        scale,
    } = *sequence;
    let qkv_cols = rows.len() / len; // len ≥ 1: empty sequences return before the heads
    let hd = qkv_cols / 3;
    // This head's q, k, v as contiguous [len, d] f32 matrices, rotary applied to q and k.
    let mut q = vec![0f32; len * d];
    let mut k = vec![0f32; len * d];
    let mut v = vec![0f32; len * d];
    for i in 0..len {
        let row = &rows[i * qkv_cols..(i + 1) * qkv_cols];
        let (qi, ki, vi) = (
            &mut q[i * d..(i + 1) * d],
            &mut k[i * d..(i + 1) * d],
            &mut v[i * d..(i + 1) * d],
        );
        for j in 0..d {
            qi[j] = row[head * d + j].to_f32();
            ki[j] = row[hd + head * d + j].to_f32();
            vi[j] = row[2 * hd + head * d + j].to_f32();
        }
        if let Some(table) = rotary {
            table.rotate(qi, i);
            table.rotate(ki, i);
        }
    }
    // Both products go through a register-blocked GEMM (matrixmultiply) rather than loops of our
    // own: with head dims of 16-24 a hand loop is bound by loads and stores of the score rows
    // (one FMA per load/store pair); the GEMM micro-kernel keeps a tile of scores in registers.
    // ALiBi: bias[i][j] = slope · |i − j| is row i of a Toeplitz matrix, the slice
    // `ramp[len − 1 − i ..][..len]` of `ramp[t] = slope · |t − (len − 1)|`: one contiguous run per
    // query row, subtracted in the same pass that takes the row's maximum.
    let ramp: Option<Vec<f32>> = alibi.map(|slopes| {
        let slope = slopes[head];
        (0..2 * len - 1)
            .map(|t| slope * t.abs_diff(len - 1) as f32)
            .collect()
    });
    let mut out = vec![0f32; len * d];
    let mut scores = vec![0f32; QUERY_BLOCK.min(len) * len];
    let mut i0 = 0;
    while i0 < len {
        let m = QUERY_BLOCK.min(len - i0);
        let block = &mut scores[..m * len];
        // scores = scale · q[i0..i0+m] · kᵀ (kᵀ read from k through its strides: (p, j) = k[j·d + p])
        gemm(
            Dims { m, k: d, n: len },
            scale,
            Strided::rows(&q[i0 * d..(i0 + m) * d], d),
            Strided {
                data: &k,
                row_stride: 1,
                col_stride: d,
            },
            block,
        );
        let mut inv_denominators = [0f32; QUERY_BLOCK];
        for (r, (row, inv)) in block
            .chunks_exact_mut(len)
            .zip(inv_denominators.iter_mut())
            .enumerate()
        {
            let max = match &ramp {
                Some(ramp) => subtract_and_max(row, &ramp[len - 1 - (i0 + r)..][..len]),
                None => max_f32(row),
            };
            for s in row.iter_mut() {
                *s = exp_nonpositive(*s - max);
            }
            *inv = 1.0 / sum_f32(row);
        }
        // out[i0..i0+m] = p · v, normalized after (one multiply per output, not per score).
        let out_block = &mut out[i0 * d..(i0 + m) * d];
        gemm(
            Dims { m, k: len, n: d },
            1.0,
            Strided::rows(block, len),
            Strided::rows(&v, d),
            out_block,
        );
        for (o, &inv) in out_block.chunks_exact_mut(d).zip(&inv_denominators) {
            for x in o {
                *x *= inv;
            }
        }
        i0 += m;
    }
    out
}

/// Sizes of `C[m × n] = A[m × k] · B[k × n]`.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

/// A matrix read through strides from a slice: element (r, c) is `data[r · row_stride + c · col_stride]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Strided<'a> {
    /// Row-major with rows `row_stride` apart.
    fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Strided {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// Whether every element of a non-empty `rows × cols` matrix lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = alpha · a · b` with `c` row-major, `n` columns (its previous contents are ignored). The
/// attention never multiplies empty matrices (a sequence has ≥ 1 token, a head ≥ 1 dimension).
fn gemm(dims: Dims, alpha: f32, a: Strided<'_>, b: Strided<'_>, c: &mut [f32]) {
    let Dims { m, k, n } = dims;
    assert!(
        m > 0 && k > 0 && n > 0 && a.covers(m, k) && b.covers(k, n) && c.len() >= m * n,
        "gemm operands empty or smaller than {m}×{k}·{k}×{n}"
    );
    // Strides fit in isize: each is at most a slice length.
    let (rsa, csa) = (a.row_stride as isize, a.col_stride as isize);
    let (rsb, csb) = (b.row_stride as isize, b.col_stride as isize);
    // SAFETY: the assert above keeps every element sgemm reads, (r·rs + c·cs) for r < rows and
    // c < cols, inside `a.data` and `b.data`, and every element it writes, C(r, c) at r·n + c,
    // inside `c`; `c` is a unique borrow, so C aliases neither input, and its strides (n, 1) with
    // n ≥ 1 address distinct elements. β = 0: C need not be initialized.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How the float64 reference puts positions in.
    #[derive(Clone, Copy)]
    enum Mode<'a> {
        /// Rotary with this base (positions from `position_ids`).
        Rotary(f64),
        /// No positions at all.
        Plain,
        /// `score −= slopes[h] · |i − j|`, i and j the offsets in the sequence.
        Alibi(&'a [f64]),
        /// A wrong ALiBi for the negative controls: the query's offset counted from the start of
        /// the pack, the key's from the start of its sequence.
        AlibiQueryFromPackStart(&'a [f64]),
    }

    /// Independent float64 reference of the contract: straightforward loops, rotary in f64.
    fn reference(
        qkv: &[f64],
        cu: &[i32],
        pos: &[i64],
        h: usize,
        d: usize,
        rotary: bool,
        base: f64,
    ) -> Vec<f64> {
        let mode = if rotary {
            Mode::Rotary(base)
        } else {
            Mode::Plain
        };
        reference_in(qkv, cu, pos, h, d, mode)
    }

    fn reference_in(
        qkv: &[f64],
        cu: &[i32],
        pos: &[i64],
        h: usize,
        d: usize,
        mode: Mode,
    ) -> Vec<f64> {
        let hd = h * d;
        let cols = 3 * hd;
        let total = *cu.last().expect("non-empty") as usize;
        let mut out = vec![0f64; total * hd];
        // position_ids are read with rotary only (ALiBi calls may pass none).
        let position = |t: usize| pos.get(t).copied().unwrap_or(0);
        let rot = |x: &[f64], p: i64| -> Vec<f64> {
            let Mode::Rotary(base) = mode else {
                return x.to_vec();
            };
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
                let keys: Vec<Vec<f64>> = (s..e)
                    .map(|j| rot(&qkv[j * cols + hd + head * d..][..d], position(j)))
                    .collect();
                for i in s..e {
                    let q = rot(&qkv[i * cols + head * d..][..d], position(i));
                    let mut sc = Vec::with_capacity(e - s);
                    for (j, k) in (s..e).zip(&keys) {
                        let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        let bias = match mode {
                            Mode::Alibi(slopes) => slopes[head] * (i - s).abs_diff(j - s) as f64,
                            Mode::AlibiQueryFromPackStart(slopes) => {
                                slopes[head] * i.abs_diff(j - s) as f64
                            }
                            Mode::Rotary(_) | Mode::Plain => 0.0,
                        };
                        sc.push(dot / (d as f64).sqrt() - bias);
                    }
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    let o = &mut out[i * hd + head * d..][..d];
                    for (p, j) in ex.iter().zip(s..e) {
                        let v = &qkv[j * cols + 2 * hd + head * d..][..d];
                        for (oc, vc) in o.iter_mut().zip(v) {
                            *oc += p / z * vc;
                        }
                    }
                }
            }
        }
        out
    }

    /// DNABERT-S's slopes (MosaicBERT's ALiBi for 12 heads): 2^-1 … 2^-8, then 2^-0.5 … 2^-3.5.
    fn dnabert_slopes() -> Vec<f32> {
        let mut s: Vec<f32> = (1..=8).map(|k| 2f32.powi(-k)).collect();
        s.extend([-0.5f32, -1.5, -2.5, -3.5].map(f32::exp2));
        s
    }

    fn widen(xs: &[f32]) -> Vec<f64> {
        xs.iter().map(|&x| f64::from(x)).collect()
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

    fn run_f32(qkv: &[f64], cu: &[i32], pos: &[i64], h: usize, rotary: bool) -> Vec<f64> {
        let params = VarlenParams {
            rotary,
            ..VarlenParams::new(h)
        };
        run_with(qkv, cu, Some(pos), &params)
    }

    /// The op in f32 on `qkv` rounded to f32, output widened; position_ids may be absent.
    fn run_with(qkv: &[f64], cu: &[i32], pos: Option<&[i64]>, params: &VarlenParams) -> Vec<f64> {
        let q32: Vec<f32> = qkv.iter().map(|&x| x as f32).collect();
        let total = *cu.last().unwrap_or(&0) as usize;
        let cols = qkv.len().checked_div(total).unwrap_or(0) / 3;
        // Poisoned: any element the op forgets to write shows up as NaN.
        let mut out = vec![f32::NAN; total * cols];
        varlen_attention(&q32, cu, pos, params, &mut out).expect("valid inputs");
        out.iter().map(|&x| f64::from(x)).collect()
    }

    #[test]
    fn fast_exp_matches_float64() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.3f32 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 1.1e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1.3e-38);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn vector_and_portable_builds_agree_bit_for_bit() {
        // The dispatching entry point (AVX2 + FMA where the CPU has them) against the body compiled
        // for baseline x86-64, on one head of one sequence with rotary, then with ALiBi.
        let (h, d, len) = (3, 24, 77);
        let (qkv, _, pos) = case(&[len], h, d, 11);
        let q32: Vec<f32> = qkv.iter().map(|&x| x as f32).collect();
        let table = RotaryTable::new(&pos, &inv_freq(d, 10000.0));
        let slopes = slopes_for(h);
        for head in 0..h {
            for alibi in [false, true] {
                let sequence = Sequence {
                    rows: &q32[..],
                    len,
                    head_dim: d,
                    rotary: (!alibi).then_some(&table),
                    alibi: alibi.then_some(&slopes[..]),
                    scale: 0.3,
                };
                let dispatched = attend_one_head(&sequence, head);
                let portable = attend_one_head_body(&sequence, head);
                let same = dispatched
                    .iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "head {head} alibi={alibi}: the two builds differ");
            }
        }
    }

    #[test]
    fn partial_reductions_match_serial_ones() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let serial_max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_f32(&xs), serial_max);
        let serial_sum: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((sum_f32(&xs) as f64 - serial_sum).abs() < 1e-3);
        let mut with_nan = xs.clone();
        with_nan[500] = f32::NAN;
        assert!(max_f32(&with_nan).is_nan());
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
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
            // Longer than QUERY_BLOCK (64): several query blocks, the last one partial.
            (&[129, 65, 200], 2, 24),
            (&[300], 1, 64),
        ];
        for (i, &(lengths, h, d)) in shapes.iter().enumerate() {
            for rotary in [true, false] {
                let (qkv, cu, pos) = case(lengths, h, d, i as u64 + 1);
                let got = run_f32(&qkv, &cu, &pos, h, rotary);
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
        let merged = run_f32(&qkv, &[0, 15], &pos, 2, true);
        assert!(max_rel_err(&merged, &want) > 1e-3);
        // Rotary left out (every position 0). Positions running on across sequences would not be
        // caught here: rotary scores depend only on position differences within a sequence.
        let zeros = vec![0i64; 15];
        let got = run_f32(&qkv, &cu, &zeros, 2, true);
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
        // Tokens but no columns at all: an error, not a division by zero.
        let e = varlen_attention::<f32>(&[], &[0, 2, 4], Some(&pos), &p, &mut [])
            .expect_err("zero-width qkv");
        assert!(e.to_string().contains("head_dim"), "{e}");
    }

    /// Slopes for `h` heads that differ from head to head (DNABERT-S's, cycled).
    fn slopes_for(h: usize) -> Vec<f32> {
        dnabert_slopes().into_iter().cycle().take(h).collect()
    }

    #[test]
    fn alibi_matches_float64_reference_on_mixed_shapes() {
        let shapes: &[(&[usize], usize, usize)] = &[
            (&[1], 1, 2),
            (&[1, 5, 1, 17], 2, 16),
            (&[3, 0, 40], 4, 8),
            (&[64, 1, 33], 12, 16),
            (&[9], 2, 24),
            (&[129, 65, 200], 3, 24),
            (&[300], 1, 64),
        ];
        for (i, &(lengths, h, d)) in shapes.iter().enumerate() {
            let (qkv, cu, _) = case(lengths, h, d, i as u64 + 101);
            let params = VarlenParams::alibi(slopes_for(h));
            // ALiBi needs no position_ids.
            let got = run_with(&qkv, &cu, None, &params);
            assert!(got.iter().all(|x| x.is_finite()), "unwritten output");
            let slopes = widen(&slopes_for(h));
            let want = reference_in(&qkv, &cu, &[], h, d, Mode::Alibi(&slopes));
            let err = max_rel_err(&got, &want);
            assert!(err <= 1e-5, "{lengths:?} h={h} d={d}: {err}");
        }
    }

    #[test]
    fn alibi_at_dnabert_s_shape_matches_float64_in_every_precision() {
        // 12 heads of 64, scale 64^-0.5 = 0.125, a pack with a single token, a multiple of the
        // query block, a partial last block and a short sequence.
        let (h, d) = (12, 64);
        let (qkv, cu, _) = case(&[1, 128, 301, 7], h, d, 77);
        let params = VarlenParams::alibi(dnabert_slopes());
        assert_eq!(params.num_heads, 12);
        let slopes = widen(&dnabert_slopes());
        let want = reference_in(&qkv, &cu, &[], h, d, Mode::Alibi(&slopes));
        let err = max_rel_err(&run_with(&qkv, &cu, None, &params), &want);
        assert!(err <= 1e-5, "f32: {err}");

        // 16-bit: against the reference on the same rounded inputs.
        let q16: Vec<f16> = qkv.iter().map(|&x| f16::from_f64(x)).collect();
        let rounded: Vec<f64> = q16.iter().map(|x| x.to_f64()).collect();
        let want16 = reference_in(&rounded, &cu, &[], h, d, Mode::Alibi(&slopes));
        let mut out = vec![f16::NAN; want.len()];
        varlen_attention(&q16, &cu, None, &params, &mut out).expect("valid inputs");
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        assert!(max_rel_err(&got, &want16) <= 2e-3);

        let qb: Vec<bf16> = qkv.iter().map(|&x| bf16::from_f64(x)).collect();
        let rounded: Vec<f64> = qb.iter().map(|x| x.to_f64()).collect();
        let want_b = reference_in(&rounded, &cu, &[], h, d, Mode::Alibi(&slopes));
        let mut out = vec![bf16::NAN; want.len()];
        varlen_attention(&qb, &cu, None, &params, &mut out).expect("valid inputs");
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        assert!(max_rel_err(&got, &want_b) <= 8e-3);
    }

    #[test]
    fn alibi_on_a_2600_token_sequence_matches_float64() {
        // No length limit: far past DNABERT-S's 512-token training length, with its weakest
        // (2^-8: every key still counts) and strongest (2^-0.5) slopes, between a short sequence
        // before and after.
        let slopes = vec![2f32.powi(-8), 2f32.powf(-0.5), 2f32.powi(-4)];
        let (h, d) = (3, 16);
        let (qkv, cu, _) = case(&[5, 2600, 3], h, d, 2600);
        let got = run_with(&qkv, &cu, None, &VarlenParams::alibi(slopes.clone()));
        let want = reference_in(&qkv, &cu, &[], h, d, Mode::Alibi(&widen(&slopes)));
        let err = max_rel_err(&got, &want);
        assert!(err <= 1e-5, "{err}");
    }

    #[test]
    fn the_alibi_check_can_fail() {
        // The op (ALiBi on) against references with the bugs an implementation could have: each
        // must differ from the op's output far beyond the 1e-5 the correct reference meets.
        let (h, d) = (4, 16);
        let slopes = vec![0.5f32, 0.125, 2f32.powf(-0.5), 2f32.powi(-6)];
        let (qkv, cu, _) = case(&[40, 70, 25], h, d, 9);
        let got = run_with(&qkv, &cu, None, &VarlenParams::alibi(slopes.clone()));
        let right = widen(&slopes);
        let err = |mode| max_rel_err(&got, &reference_in(&qkv, &cu, &[], h, d, mode));
        assert!(err(Mode::Alibi(&right)) <= 1e-5);
        let reversed: Vec<f64> = right.iter().rev().copied().collect();
        let flipped: Vec<f64> = right.iter().map(|s| -s).collect();
        let controls = [
            ("slopes in reversed head order", err(Mode::Alibi(&reversed))),
            ("bias with the sign flipped", err(Mode::Alibi(&flipped))),
            (
                "query offset counted from the pack start",
                err(Mode::AlibiQueryFromPackStart(&right)),
            ),
            ("no bias at all", err(Mode::Plain)),
        ];
        // (Both offsets counted from the pack start would give the same distances: not a bug.)
        for (what, e) in controls {
            assert!(e > 1e-3, "{what}: only {e:e} from the op's output");
        }
    }

    #[test]
    fn alibi_attributes_are_checked() {
        let qkv = vec![0.5f32; 4 * 3 * 2 * 4];
        let mut out = vec![0f32; 4 * 2 * 4];
        let cu = [0, 2, 4];
        let run = |p: &VarlenParams, out: &mut [f32]| varlen_attention(&qkv, &cu, None, p, out);
        assert!(run(&VarlenParams::alibi(vec![0.5, 0.25]), &mut out).is_ok());
        // Rotary and ALiBi exclude each other (rotary's default is on).
        let both = VarlenParams {
            rotary: true,
            ..VarlenParams::alibi(vec![0.5, 0.25])
        };
        let e = run(&both, &mut out).expect_err("rotary + alibi");
        assert!(e.to_string().contains("rotary = 0"), "{e}");
        // One slope per head.
        let short = VarlenParams {
            num_heads: 2,
            ..VarlenParams::alibi(vec![0.5])
        };
        let e = run(&short, &mut out).expect_err("1 slope, 2 heads");
        assert!(e.to_string().contains("expected num_heads (2)"), "{e}");
        for bad_slope in [f32::NAN, f32::INFINITY] {
            let e = run(&VarlenParams::alibi(vec![0.5, bad_slope]), &mut out)
                .expect_err("non-finite slope");
            assert!(e.to_string().contains("finite"), "{e}");
        }
        // An empty list is no ALiBi (version-1 behaviour), as an absent attribute.
        let plain = VarlenParams {
            rotary: false,
            ..VarlenParams::new(2)
        };
        let empty = VarlenParams {
            alibi_slopes: Some(Vec::new()),
            ..plain.clone()
        };
        let mut a = vec![0f32; out.len()];
        let mut b = vec![0f32; out.len()];
        assert!(run(&plain, &mut a).is_ok() && run(&empty, &mut b).is_ok());
        assert_eq!(a, b);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_shapes_match_reference(
            lengths in proptest::collection::vec(0usize..150, 1..5),
            h in 1usize..5,
            half_d in 1usize..9,
            seed in any::<u64>(),
            mode in 0u8..3,
            slopes in proptest::collection::vec(-0.25f32..1.0, 4),
        ) {
            // mode 0: rotary, 1: no positions, 2: ALiBi with random slopes (negative ones too:
            // the contract allows any finite slope).
            let d = half_d * 2;
            let (qkv, cu, pos) = case(&lengths, h, d, seed);
            let (got, want) = if mode == 2 {
                let slopes = slopes[..h].to_vec();
                let wide = widen(&slopes);
                (
                    run_with(&qkv, &cu, None, &VarlenParams::alibi(slopes)),
                    reference_in(&qkv, &cu, &pos, h, d, Mode::Alibi(&wide)),
                )
            } else {
                let rotary = mode == 0;
                (
                    run_f32(&qkv, &cu, &pos, h, rotary),
                    reference(&qkv, &cu, &pos, h, d, rotary, 10000.0),
                )
            };
            prop_assert!(got.iter().all(|x| x.is_finite()));
            prop_assert!(max_rel_err(&got, &want) <= 1e-5);
        }
    }
}
