//! The Rust launch path on a real GPU, against a float64 reference of the contract written here.
//! Needs the NVIDIA driver and the built fatbin: ignored by default, run on the GPU machine with
//! `cargo test -p virnuc-cuda --test gpu -- --ignored` (tools/gpu/varlen_attention/run.sh does).

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use half::{bf16, f16};
use virnuc_cuda::{Attributes, DType, DevicePointers, HEAD_DIMS, Problem, VarlenKernels};

fn kernel_dir() -> std::path::PathBuf {
    std::env::var_os("VARLEN_KERNEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/varlen_attention")
        })
}

/// Small deterministic generator (no extra dependency): xorshift64*, uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The contract in float64 (angles as float32 products, as the README specifies); with `alibi`
/// (one slope per head) the scores get `− slope · |i − j|`, offsets within the sequence.
fn reference(
    qkv: &[f64],
    lens: &[usize],
    heads: usize,
    d: usize,
    scale: f64,
    rotary: bool,
    alibi: &[f64],
) -> Vec<f64> {
    let width = 3 * heads * d;
    let total: usize = lens.iter().sum();
    let half = d / 2;
    // As HF's EsmRotaryEmbedding: 1 / base^(2i/D), exponent and power in f32 (the power correctly
    // rounded, as glibc's powf returns it).
    let inv: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / d as f32;
            1.0 / (10000f64.powf(f64::from(exponent)) as f32)
        })
        .collect();
    let mut out = vec![0.0; total * heads * d];
    let mut start = 0;
    for &len in lens {
        for h in 0..heads {
            let vec_of = |t: usize, part: usize, pos: usize| -> Vec<f64> {
                let x = &qkv[t * width + part * heads * d + h * d..][..d];
                if !rotary || part == 2 {
                    return x.to_vec();
                }
                let mut y = vec![0.0; d];
                for i in 0..half {
                    let angle = f64::from(pos as f32 * inv[i]);
                    let (s, c) = angle.sin_cos();
                    y[i] = x[i] * c - x[i + half] * s;
                    y[i + half] = x[i + half] * c + x[i] * s;
                }
                y
            };
            let ks: Vec<Vec<f64>> = (0..len).map(|j| vec_of(start + j, 1, j)).collect();
            let vs: Vec<Vec<f64>> = (0..len).map(|j| vec_of(start + j, 2, j)).collect();
            for i in 0..len {
                let q = vec_of(start + i, 0, i);
                let slope = alibi.get(h).copied().unwrap_or(0.0);
                let s: Vec<f64> = ks
                    .iter()
                    .enumerate()
                    .map(|(j, k)| {
                        scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
                            - slope * i.abs_diff(j) as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                let o = &mut out[(start + i) * heads * d + h * d..][..d];
                for (pj, v) in p.iter().zip(&vs) {
                    for (oc, vc) in o.iter_mut().zip(v) {
                        *oc += pj / l * vc;
                    }
                }
            }
        }
        start += len;
    }
    out
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

struct Gpu {
    stream: Arc<CudaStream>,
}

fn gpu() -> Gpu {
    let ctx = CudaContext::new(0).expect("GPU 0 (this test needs the NVIDIA driver)");
    ctx.bind_to_thread().expect("bind context");
    Gpu {
        stream: ctx.default_stream(),
    }
}

/// Stream, kernels, validated problem and the uploaded `cu_seqlens` / `position_ids` of one case.
type Launch<'a> = (
    &'a Arc<CudaStream>,
    &'a VarlenKernels,
    &'a Problem,
    &'a CudaSlice<i32>,
    &'a CudaSlice<i64>,
);

/// Uploads `qkv`, fills the output with `poison`, launches the kernel and returns the output.
fn launch<T: DeviceRepr + ValidAsZeroBits + Clone + Unpin>(
    (s, kernels, problem, d_cu, d_pos): Launch<'_>,
    qkv: &[T],
    poison: T,
    n_out: usize,
) -> Vec<T> {
    let d_qkv: CudaSlice<T> = s.clone_htod(qkv).expect("h2d");
    let mut d_out: CudaSlice<T> = s.clone_htod(&vec![poison; n_out]).expect("h2d");
    {
        let (q, _a) = d_qkv.device_ptr(s);
        let (c, _b) = d_cu.device_ptr(s);
        let (p, _c) = d_pos.device_ptr(s);
        let (o, _d) = d_out.device_ptr_mut(s);
        let ptrs = DevicePointers {
            qkv: q,
            cu_seqlens: c,
            position_ids: p,
            out: o,
        };
        // SAFETY: buffers of the validated shapes on this context's stream.
        unsafe { kernels.launch(s.cu_stream().cast(), problem, &ptrs) }.expect("launch");
    }
    s.clone_dtoh(&d_out).expect("d2h")
}

/// Runs one case through `VarlenKernels::launch`; returns the output as f64 (NaN-poisoned first)
/// and the float64 reference. Non-empty `alibi`: ALiBi mode with these slopes (rotary off).
#[allow(clippy::too_many_arguments)]
fn run_case(
    g: &Gpu,
    kernels: &VarlenKernels,
    dtype: DType,
    qkv_host: &[f64],
    lens: &[usize],
    heads: usize,
    d: usize,
    rotary: bool,
    alibi: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let total: usize = lens.iter().sum();
    let mut cu = vec![0i32];
    let mut pos = Vec::with_capacity(total);
    for &l in lens {
        cu.push(cu.last().copied().unwrap_or(0) + l as i32);
        pos.extend(0..l as i64);
    }
    // Quantize the inputs to the dtype; the reference sees exactly those values.
    let (bits, rounded): (Vec<u16>, Vec<f64>) = match dtype {
        DType::F16 => qkv_host
            .iter()
            .map(|&x| f16::from_f64(x))
            .map(|h| (h.to_bits(), h.to_f64()))
            .unzip(),
        DType::BF16 => qkv_host
            .iter()
            .map(|&x| bf16::from_f64(x))
            .map(|h| (h.to_bits(), h.to_f64()))
            .unzip(),
        DType::F32 => (
            Vec::new(),
            qkv_host.iter().map(|&x| f64::from(x as f32)).collect(),
        ),
    };
    let attrs = Attributes {
        num_heads: heads as i64,
        rotary: i64::from(rotary),
        alibi_slopes: alibi.to_vec(),
        ..Attributes::default()
    };
    // ALiBi calls carry no position_ids (the contract lets them be absent).
    let pos_shape = [total as i64];
    let problem = Problem::validate(
        &attrs,
        dtype,
        &[total as i64, (3 * heads * d) as i64],
        &[cu.len() as i64],
        alibi.is_empty().then_some(&pos_shape[..]),
    )
    .expect("valid problem");
    let s = &g.stream;
    let d_cu: CudaSlice<i32> = s.clone_htod(&cu).expect("h2d");
    let d_pos: CudaSlice<i64> = s.clone_htod(&pos).expect("h2d");
    let n_out = total * heads * d;
    let buffers = (s, kernels, &problem, &d_cu, &d_pos);
    let got: Vec<f64> = match dtype {
        DType::F32 => {
            let host: Vec<f32> = rounded.iter().map(|&x| x as f32).collect();
            launch(buffers, &host, f32::NAN, n_out)
                .into_iter()
                .map(f64::from)
                .collect()
        }
        DType::F16 => launch(buffers, &bits, f16::NAN.to_bits(), n_out)
            .into_iter()
            .map(|b| f16::from_bits(b).to_f64())
            .collect(),
        DType::BF16 => launch(buffers, &bits, bf16::NAN.to_bits(), n_out)
            .into_iter()
            .map(|b| bf16::from_bits(b).to_f64())
            .collect(),
    };
    let want = reference(
        &rounded,
        lens,
        heads,
        d,
        (d as f64).powf(-0.5) as f32 as f64,
        rotary,
        &alibi.iter().map(|&s| f64::from(s)).collect::<Vec<_>>(),
    );
    (got, want)
}

/// DNABERT-S's ALiBi slopes (2^-1 … 2^-8, then 2^-0.5 … 2^-3.5), cycled over `heads`.
fn dnabert_slopes(heads: usize) -> Vec<f32> {
    let mut s: Vec<f32> = (1..=8).map(|k| 2f32.powi(-k)).collect();
    s.extend([-0.5f32, -1.5, -2.5, -3.5].map(f32::exp2));
    s.into_iter().cycle().take(heads).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU and the built fatbin (run on the GPU machine)"]
fn rust_launch_matches_float64_reference() {
    let g = gpu();
    let kernels = VarlenKernels::open(&kernel_dir()).expect("fatbin built");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let mut worst = Vec::new();
    for d in HEAD_DIMS {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for rotary in [true, false] {
                let n = 1 + rng.below(12);
                let mut lens: Vec<usize> = (0..n).map(|_| 1 + rng.below(300)).collect();
                lens.push(0); // an empty sequence produces nothing and must not disturb others
                let heads = 2;
                let total: usize = lens.iter().sum();
                let qkv: Vec<f64> = (0..total * 3 * heads * d)
                    .map(|_| rng.uniform() * 2.0)
                    .collect();
                let (got, want) = run_case(&g, &kernels, dtype, &qkv, &lens, heads, d, rotary, &[]);
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "{dtype:?} D={d}: unwritten or non-finite output"
                );
                let err = rel_err(&got, &want);
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-3 };
                println!(
                    "{dtype:?} D={d:3} rotary={rotary:5} seqs={n:2} tokens={total:5} rel_err={err:.2e}"
                );
                assert!(
                    err <= tol,
                    "{dtype:?} D={d} rotary={rotary}: rel err {err:.3e} > {tol:e}"
                );
                worst.push(err);
            }
        }
    }
    println!(
        "{} cases through the Rust loader, all within tolerance",
        worst.len()
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and the built fatbin (run on the GPU machine)"]
fn rust_launch_in_alibi_mode_matches_float64_reference() {
    // Every dtype and head dim in ALiBi mode; at D = 64 DNABERT-S's 12 heads with one sequence of
    // 2600 tokens (no length limit) among short ones.
    let g = gpu();
    let kernels = VarlenKernels::open(&kernel_dir()).expect("fatbin built");
    let mut rng = Rng(0x51ab_1e5e_ed00_0001 ^ std::process::id() as u64);
    let mut cases = 0;
    for d in HEAD_DIMS {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (heads, mut lens) = if d == 64 {
                (12, vec![1, 2600, 7, 130])
            } else {
                let n = 1 + rng.below(12);
                (4, (0..n).map(|_| 1 + rng.below(300)).collect())
            };
            lens.push(0);
            let total: usize = lens.iter().sum();
            let qkv: Vec<f64> = (0..total * 3 * heads * d)
                .map(|_| rng.uniform() * 2.0)
                .collect();
            let slopes = dnabert_slopes(heads);
            let (got, want) = run_case(&g, &kernels, dtype, &qkv, &lens, heads, d, false, &slopes);
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{dtype:?} D={d} ALiBi: unwritten or non-finite output"
            );
            let err = rel_err(&got, &want);
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-3 };
            println!("{dtype:?} D={d:3} ALiBi H={heads:2} tokens={total:5} rel_err={err:.2e}");
            assert!(
                err <= tol,
                "{dtype:?} D={d} ALiBi: rel err {err:.3e} > {tol:e}"
            );
            // Negative controls on the DNABERT-S-shaped fp16 output: references with the slopes in
            // reversed head order and without ALiBi must be far from it.
            if d == 64 && dtype == DType::F16 {
                let reversed: Vec<f32> = slopes.iter().rev().copied().collect();
                let (_, want_reversed) =
                    run_case(&g, &kernels, dtype, &qkv, &lens, heads, d, false, &reversed);
                let (_, want_plain) =
                    run_case(&g, &kernels, dtype, &qkv, &lens, heads, d, false, &[]);
                let (e_rev, e_plain) = (rel_err(&got, &want_reversed), rel_err(&got, &want_plain));
                println!("  control: vs reversed slopes {e_rev:.2e}, vs no ALiBi {e_plain:.2e}");
                assert!(
                    e_rev > 10.0 * tol && e_plain > 10.0 * tol,
                    "the ALiBi check cannot tell wrong slopes apart"
                );
            }
            cases += 1;
        }
    }
    println!("{cases} ALiBi cases through the Rust loader, all within tolerance");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn launch_without_a_current_context_fails_loudly() {
    let kernels = VarlenKernels::open(&kernel_dir()).expect("fatbin built");
    // A fresh thread has no current context; cuInit is done by CudaContext elsewhere or here.
    let _ctx = CudaContext::new(0).expect("driver");
    let handle = std::thread::spawn(move || {
        let problem = Problem::validate(
            &Attributes {
                num_heads: 1,
                ..Attributes::default()
            },
            DType::F16,
            &[4, 48],
            &[2],
            Some(&[4]),
        )
        .expect("valid");
        let ptrs = DevicePointers {
            qkv: 1,
            cu_seqlens: 1,
            position_ids: 1,
            out: 1,
        };
        // SAFETY: expected to fail before any launch (no context on this thread).
        unsafe { kernels.launch(std::ptr::null_mut(), &problem, &ptrs) }
            .expect_err("no context")
            .to_string()
    });
    let err = handle.join().expect("thread");
    assert!(err.contains("no CUDA context"), "{err}");
}
