//! Pure host-side facts of the kernel: dtypes, launch geometry and the validation of one call's
//! shapes and attributes. Mirrors `plugins/varlen_attention/varlen_attention_launch.h` (the C++
//! side used by the TensorRT plugin); a test below checks the two tables agree.

use crate::CudaError;

/// Element type of `qkv` and `out`, with its ONNX `TensorProto` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::F16 => 10,
            DType::BF16 => 16,
        }
    }

    pub fn from_onnx_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(DType::F32),
            10 => Some(DType::F16),
            16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Name part of the kernel symbols (`virnuc_varlen_attention_<tag>_d<head_dim>`).
    pub fn tag(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 5] = [16, 24, 32, 64, 128];

/// Name of the entry point for `dtype` and `head_dim` in the fatbin: the rotary/no-position kernel,
/// or with `alibi` the ALiBi one (`virnuc_varlen_attention_alibi_<tag>_d<head_dim>`).
pub fn kernel_name(dtype: DType, head_dim: usize, alibi: bool) -> String {
    let mode = if alibi { "alibi_" } else { "" };
    format!("virnuc_varlen_attention_{mode}{}_d{head_dim}", dtype.tag())
}

/// Most heads the ALiBi kernels take: their slopes travel by value in the kernel parameters
/// (`kMaxAlibiHeads` in `varlen_attention_launch.h`).
pub const MAX_ALIBI_HEADS: usize = 128;

/// The kernels' last parameter, `virnuc::varlen::AlibiSlopes`: one slope per head, zeros after.
#[repr(C)]
#[derive(Clone, Copy, PartialEq)]
pub struct AlibiSlopes {
    pub slope: [f32; MAX_ALIBI_HEADS],
}

impl AlibiSlopes {
    /// No ALiBi (what the rotary kernels are passed).
    pub const NONE: Self = Self {
        slope: [0.0; MAX_ALIBI_HEADS],
    };

    fn from_slice(slopes: &[f32]) -> Self {
        let mut out = Self::NONE;
        out.slope[..slopes.len()].copy_from_slice(slopes);
        out
    }
}

impl std::fmt::Debug for AlibiSlopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self
            .slope
            .iter()
            .rposition(|&s| s != 0.0)
            .map_or(0, |i| i + 1);
        f.debug_tuple("AlibiSlopes")
            .field(&&self.slope[..last])
            .finish()
    }
}

/// Threads per block and query rows per block of the kernel for `dtype` / `head_dim`.
///
/// fp16 at head dim 64 and 128 runs 32 query rows a warp: 4 warps (128 threads over 128 rows) at
/// 64, 2 warps (64 threads over 64 rows) at 128. The other 16-bit kernels run one warp per 16
/// query rows: 8 warps, or 4 at head dim 128 (register pressure); the fp32 kernel runs 128
/// threads over 32 rows.
pub fn block_shape(dtype: DType, head_dim: usize) -> (u32, usize) {
    match dtype {
        DType::F32 => (128, 32),
        DType::F16 if head_dim == 64 => (128, 128),
        DType::F16 if head_dim == 128 => (64, 64),
        DType::F16 | DType::BF16 if head_dim == 128 => (128, 64),
        DType::F16 | DType::BF16 => (256, 128),
    }
}

/// Launch configuration of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// Grid of `floor(total / BM) + batch` slots by `num_heads`: sequence `b` owns slots
/// `[cu[b] / BM + b, cu[b + 1] / BM + b + 1)`, at least `ceil(len_b / BM)` of them, so no host
/// knowledge of the longest sequence is needed. `None` when there is nothing to launch.
pub fn launch_config(
    total_tokens: usize,
    batch: usize,
    num_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> Result<Option<LaunchConfig>, CudaError> {
    if total_tokens == 0 || batch == 0 || num_heads == 0 {
        return Ok(None);
    }
    let (threads, bm) = block_shape(dtype, head_dim);
    let slots = total_tokens / bm + batch;
    let too_big = |what: &str, v: usize| {
        CudaError::Invalid(format!("{what} {v} exceeds the kernel's limits"))
    };
    let gx = u32::try_from(slots).map_err(|_| too_big("grid", slots))?;
    let gy = u32::try_from(num_heads)
        .ok()
        .filter(|&h| h <= 65_535)
        .ok_or_else(|| too_big("num_heads", num_heads))?;
    Ok(Some(LaunchConfig {
        grid: (gx, gy, 1),
        block: (threads, 1, 1),
    }))
}

/// Attributes of a `com.virnuc:VarlenAttention` node (contract: plugins/varlen_attention/README.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub num_heads: i64,
    /// `None`: the default `head_dim ** -0.5`.
    pub scale: Option<f32>,
    pub rotary: i64,
    pub rotary_base: f32,
    /// ALiBi slopes, one per head (contract version 2); empty: no ALiBi.
    pub alibi_slopes: Vec<f32>,
}

impl Default for Attributes {
    fn default() -> Self {
        Self {
            num_heads: 0,
            scale: None,
            rotary: 1,
            rotary_base: 10000.0,
            alibi_slopes: Vec::new(),
        }
    }
}

impl Attributes {
    /// The ALiBi slopes as the kernels take them, `None` without ALiBi; checks the rules that need
    /// no shapes (the op checks them when its kernel is created): rotary 0 or 1, and with ALiBi
    /// rotary = 0 and one finite slope per head, at most [`MAX_ALIBI_HEADS`].
    pub fn alibi(&self) -> Result<Option<AlibiSlopes>, CudaError> {
        let bad = |m: String| Err(CudaError::Invalid(m));
        if !matches!(self.rotary, 0 | 1) {
            return bad(format!(
                "attribute rotary must be 0 or 1, got {}",
                self.rotary
            ));
        }
        let n = self.alibi_slopes.len();
        if n == 0 {
            return Ok(None);
        }
        if self.rotary == 1 {
            return bad(
                "alibi_slopes needs rotary = 0 (rotary and ALiBi exclude each other)".into(),
            );
        }
        if n as i64 != self.num_heads {
            return bad(format!(
                "alibi_slopes has {n} entries, expected num_heads ({})",
                self.num_heads
            ));
        }
        if n > MAX_ALIBI_HEADS {
            return bad(format!(
                "ALiBi on the GPU takes at most {MAX_ALIBI_HEADS} heads, got {n}"
            ));
        }
        if let Some(s) = self.alibi_slopes.iter().find(|s| !s.is_finite()) {
            return bad(format!("alibi_slopes must be finite, got {s}"));
        }
        Ok(Some(AlibiSlopes::from_slice(&self.alibi_slopes)))
    }
}

/// One checked call: everything `launch` needs besides the pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Problem {
    pub total_tokens: usize,
    pub batch: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub scale: f32,
    pub rotary: bool,
    pub rotary_base: f32,
    /// ALiBi mode (the `alibi` kernels) with these slopes; `None`: rotary or no positions.
    pub alibi: Option<AlibiSlopes>,
}

impl Problem {
    /// Validates shapes (`qkv [T, 3·H·D]`, `cu_seqlens [B+1]`, `position_ids [T]` or absent) and
    /// attributes. Same rules as `virnuc::varlen::validate` in the C++ header.
    pub fn validate(
        attrs: &Attributes,
        dtype: DType,
        qkv_shape: &[i64],
        cu_seqlens_shape: &[i64],
        position_ids_shape: Option<&[i64]>,
    ) -> Result<Self, CudaError> {
        let bad = |m: String| Err(CudaError::Invalid(m));
        if attrs.num_heads <= 0 {
            return bad(format!(
                "attribute num_heads must be positive, got {}",
                attrs.num_heads
            ));
        }
        let &[rows, cols] = qkv_shape else {
            return bad(format!(
                "qkv must be 2-D [total_tokens, 3*num_heads*head_dim], got shape {qkv_shape:?}"
            ));
        };
        if rows < 0 || cols <= 0 {
            return bad(format!(
                "qkv shape {qkv_shape:?} has a negative or empty dimension"
            ));
        }
        if cols % (3 * attrs.num_heads) != 0 {
            return bad(format!(
                "qkv width {cols} is not a multiple of 3*num_heads ({})",
                3 * attrs.num_heads
            ));
        }
        let head_dim = (cols / (3 * attrs.num_heads)) as usize;
        if !HEAD_DIMS.contains(&head_dim) {
            return bad(format!(
                "head_dim {head_dim} is not supported on GPU (16, 24, 32, 64, 128)"
            ));
        }
        let &[cu_len] = cu_seqlens_shape else {
            return bad(format!(
                "cu_seqlens must be 1-D [batch+1], got shape {cu_seqlens_shape:?}"
            ));
        };
        if cu_len < 1 {
            return bad("cu_seqlens must have at least one entry (batch+1)".to_string());
        }
        let rotary = match attrs.rotary {
            0 => false,
            1 => true,
            other => return bad(format!("attribute rotary must be 0 or 1, got {other}")),
        };
        let alibi = attrs.alibi()?;
        if rotary {
            match position_ids_shape {
                None => return bad("position_ids is required when rotary = 1".to_string()),
                Some(&[n]) if n == rows => {}
                Some(s) => {
                    return bad(format!(
                        "position_ids must be 1-D with total_tokens ({rows}) entries, got shape {s:?}"
                    ));
                }
            }
            if !(attrs.rotary_base.is_finite() && attrs.rotary_base > 0.0) {
                return bad(format!(
                    "attribute rotary_base must be a positive finite number, got {}",
                    attrs.rotary_base
                ));
            }
        }
        let scale = attrs.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() {
            return bad(format!("attribute scale must be finite, got {scale}"));
        }
        // The kernel indexes tokens and columns with 32-bit integers.
        let limit = i64::from(i32::MAX);
        if rows > limit || cols > limit || cu_len - 1 > limit {
            return bad(format!(
                "pack too large for 32-bit token indices: qkv {qkv_shape:?}"
            ));
        }
        Ok(Self {
            total_tokens: rows as usize,
            batch: (cu_len - 1) as usize,
            num_heads: attrs.num_heads as usize,
            head_dim,
            dtype,
            scale,
            rotary,
            rotary_base: attrs.rotary_base,
            alibi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(h: i64) -> Attributes {
        Attributes {
            num_heads: h,
            ..Attributes::default()
        }
    }

    #[test]
    fn esm2_650m_call_validates() {
        let p = Problem::validate(&attrs(20), DType::F16, &[100, 3840], &[4], Some(&[100]))
            .expect("valid");
        assert_eq!(
            (p.total_tokens, p.batch, p.num_heads, p.head_dim),
            (100, 3, 20, 64)
        );
        assert_eq!(p.scale, 0.125);
        assert!(p.rotary);
    }

    #[test]
    fn every_supported_head_dim_and_dtype() {
        for d in HEAD_DIMS {
            for dt in [DType::F32, DType::F16, DType::BF16] {
                let p = Problem::validate(&attrs(3), dt, &[7, 9 * d as i64], &[2], Some(&[7]))
                    .expect("valid");
                assert_eq!(p.head_dim, d);
                assert_eq!(DType::from_onnx_code(dt.onnx_code()), Some(dt));
            }
        }
    }

    #[test]
    fn rejections_name_the_problem() {
        type Case<'a> = (Attributes, &'a [i64], &'a [i64], Option<&'a [i64]>, &'a str);
        let cases: [Case; 8] = [
            (
                attrs(20),
                &[7, 3 * 20 * 48],
                &[2],
                Some(&[7]),
                "head_dim 48",
            ),
            (
                attrs(20),
                &[7, 3841],
                &[2],
                Some(&[7]),
                "multiple of 3*num_heads",
            ),
            (attrs(20), &[7, 1, 3840], &[2], Some(&[7]), "2-D"),
            (attrs(20), &[7, 3840], &[2, 1], Some(&[7]), "cu_seqlens"),
            (attrs(20), &[7, 3840], &[2], None, "required"),
            (attrs(20), &[7, 3840], &[2], Some(&[6]), "position_ids"),
            (attrs(0), &[7, 3840], &[2], Some(&[7]), "num_heads"),
            (
                Attributes {
                    rotary: 2,
                    ..attrs(20)
                },
                &[7, 3840],
                &[2],
                Some(&[7]),
                "rotary must be 0 or 1",
            ),
        ];
        for (a, qkv, cu, pos, needle) in cases {
            let err = Problem::validate(&a, DType::F16, qkv, cu, pos)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        // rotary = 0: position_ids may be absent.
        let a = Attributes {
            rotary: 0,
            ..attrs(20)
        };
        assert!(
            !Problem::validate(&a, DType::F16, &[7, 3840], &[2], None)
                .expect("valid")
                .rotary
        );
    }

    #[test]
    fn alibi_attributes_validate() {
        let alibi = |slopes: Vec<f32>, rotary: i64| Attributes {
            rotary,
            alibi_slopes: slopes,
            ..attrs(2)
        };
        // DNABERT-S-like call: no position_ids at all.
        let p = Problem::validate(
            &alibi(vec![0.5, 0.25], 0),
            DType::F16,
            &[7, 384],
            &[2],
            None,
        )
        .expect("valid");
        let slopes = p.alibi.expect("ALiBi on");
        assert_eq!(&slopes.slope[..3], &[0.5, 0.25, 0.0]);
        assert!(!p.rotary);
        let cases: [(Attributes, &str); 4] = [
            (alibi(vec![0.5, 0.25], 1), "rotary = 0"),
            (alibi(vec![0.5], 0), "expected num_heads (2)"),
            (alibi(vec![0.5, f32::NAN], 0), "finite"),
            (
                Attributes {
                    num_heads: 129,
                    ..alibi(vec![0.1; 129], 0)
                },
                "at most 128 heads",
            ),
        ];
        for (a, needle) in cases {
            let width = 3 * a.num_heads * 64;
            let err = Problem::validate(&a, DType::F16, &[7, width], &[2], None)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        // The C++ side has the same limit and layout.
        let header = include_str!("../../../plugins/varlen_attention/varlen_attention_launch.h");
        assert!(header.contains(&format!(
            "constexpr int kMaxAlibiHeads = {MAX_ALIBI_HEADS};"
        )));
        assert!(header.contains("float slope[kMaxAlibiHeads];"));
        assert_eq!(std::mem::size_of::<AlibiSlopes>(), 4 * MAX_ALIBI_HEADS);
    }

    #[test]
    fn geometry_matches_the_cpp_header_and_kernel() {
        // The C++ table (TensorRT plugin / host launcher) and the kernel's own constants.
        let header = include_str!("../../../plugins/varlen_attention/varlen_attention_launch.h");
        assert!(header.contains("if (onnx_dtype == kOnnxFloat) return 128;"));
        assert!(header.contains("return head_dim == 128 ? 128 : 256;"));
        assert!(header.contains("if (onnx_dtype == kOnnxFloat) return 32;"));
        assert!(header.contains("if (onnx_dtype == kOnnxFloat16 && head_dim == 64) return 128;"));
        assert!(header.contains("if (onnx_dtype == kOnnxFloat16 && head_dim == 128) return 64;"));
        assert!(header.contains("return threads(onnx_dtype, head_dim);  // 32 rows a warp"));
        assert!(
            !header.contains("#ifdef"),
            "the launch table has no build variants"
        );
        let kernel = include_str!("../../../plugins/varlen_attention/varlen_attention.cu");
        assert!(kernel.contains("return D == 128 ? 4 : 8;"));
        assert!(kernel.contains("return D == 128 ? 2 : 4;"));
        assert!(kernel.contains("return __is_same(T, __half) && (D == 64 || D == 128);"));
        assert!(kernel.contains("constexpr int kBlockM32 = 32;"));
        assert!(
            !kernel.contains("VARLEN_V4"),
            "one fp16 kernel, no build switch"
        );
        assert_eq!(block_shape(DType::BF16, 64), (256, 128));
        assert_eq!(block_shape(DType::BF16, 128), (128, 64));
        assert_eq!(block_shape(DType::F16, 32), (256, 128));
        assert_eq!(block_shape(DType::F32, 16), (128, 32));
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for d in HEAD_DIMS {
                for alibi in [false, true] {
                    let name = kernel_name(dt, d, alibi);
                    assert!(kernel.contains(&format!("({name}, ")), "{name} missing");
                }
            }
        }
    }

    #[test]
    fn fp16_d64_and_d128_run_32_rows_a_warp() {
        // 4 warps over 128 rows at D = 64, 2 warps over 64 rows at D = 128: the grids of the
        // 8-warp (4 at D = 128) kernel, half the threads.
        assert_eq!(block_shape(DType::F16, 64), (128, 128));
        assert_eq!(block_shape(DType::F16, 128), (64, 64));
        for (d, threads) in [(64, 128), (128, 64)] {
            let cfg = launch_config(1000, 3, 20, d, DType::F16)
                .expect("fits")
                .expect("work");
            assert_eq!(cfg.block, (threads, 1, 1));
            assert_eq!(cfg.grid, (1000 / threads + 3, 20, 1));
        }
    }

    #[test]
    fn nothing_to_launch_for_empty_packs() {
        assert_eq!(launch_config(0, 3, 20, 64, DType::F16).expect("ok"), None);
        assert_eq!(launch_config(10, 0, 20, 64, DType::F16).expect("ok"), None);
    }

    proptest! {
        /// Every query tile of every sequence has a slot inside the grid (the kernel's
        /// assignment), whatever the lengths, empty sequences and tile-size multiples included.
        #[test]
        fn every_tile_has_a_slot(lens in prop::collection::vec(prop_oneof![Just(0usize), Just(64), Just(128), 0usize..1100], 1..300),
                                 dt in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
                                 d in prop::sample::select(HEAD_DIMS.to_vec())) {
            let mut cu = vec![0usize];
            for l in &lens { cu.push(cu.last().copied().unwrap_or(0) + l); }
            let total = *cu.last().unwrap_or(&0);
            let (_, bm) = block_shape(dt, d);
            match launch_config(total, lens.len(), 20, d, dt).expect("fits") {
                None => prop_assert_eq!(total, 0),
                Some(cfg) => {
                    let mut covered = 0usize;
                    for b in 0..lens.len() {
                        let s0 = cu[b] / bm + b;
                        let s1 = cu[b + 1] / bm + b + 1;
                        let tiles = lens[b].div_ceil(bm);
                        prop_assert!(s1 - s0 >= tiles);
                        prop_assert!(s0 + tiles <= cfg.grid.0 as usize);
                        covered += tiles;
                    }
                    prop_assert!(covered <= cfg.grid.0 as usize);
                    prop_assert_eq!(cfg.grid.1, 20);
                }
            }
        }
    }
}
