//! Times the CPU `VarlenAttention` op on packs shaped like the benchmark workloads.
//!
//! `cargo run --release -p virnuc-engine --example varlen_cpu_bench [-- REPEATS]`
//!
//! chunk500: lengths 168 (75%) or 20-168, 2048 tokens (the CPU default budget); broad: log-normal
//! 50-1024, 4096 tokens. Head shapes of ESM-2 8M (20 × 16), 35M (20 × 24) and 650M (20 × 64) with
//! rotary, and DNABERT-S (12 × 64) with ALiBi, fp32. Prints the median of REPEATS runs (default 7)
//! per shape.

use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use virnuc_engine::varlen::{VarlenParams, varlen_attention};

fn lengths(mix: &str, budget: usize, rng: &mut XorShiftRng) -> Vec<usize> {
    let mut out = Vec::new();
    let mut total = 0;
    loop {
        let n = match mix {
            "chunk500" if rng.random::<f64>() < 0.75 => 168,
            "chunk500" => 20 + (rng.random::<f64>() * 149.0) as usize,
            _ => {
                // Box-Muller normal → log-normal(ln 300, 0.7), clipped to 50..=1024.
                let z = (-2.0 * rng.random::<f64>().max(1e-12).ln()).sqrt()
                    * (2.0 * std::f64::consts::PI * rng.random::<f64>()).cos();
                ((300f64.ln() + 0.7 * z).exp() as usize).clamp(50, 1024)
            }
        };
        if total + n > budget {
            return out;
        }
        total += n;
        out.push(n);
    }
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let mut rng = XorShiftRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    for (mix, budget) in [("chunk500", 2048), ("broad", 4096)] {
        let lens = lengths(mix, budget, &mut rng);
        let total: usize = lens.iter().sum();
        let mut cu = vec![0i32];
        let mut pos = Vec::with_capacity(total);
        for &n in &lens {
            cu.push(cu.last().copied().unwrap_or(0) + n as i32);
            pos.extend(0..n as i64);
        }
        for (model, h, d) in [
            ("8M", 20, 16),
            ("35M", 20, 24),
            ("650M", 20, 64),
            ("DNABERT-S", 12, 64),
        ] {
            let qkv: Vec<f32> = (0..total * 3 * h * d)
                .map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32)
                .collect();
            let mut out = vec![0f32; total * h * d];
            let params = if model == "DNABERT-S" {
                // ALiBi slopes 2^-1 … 2^-8, then 2^-0.5 … 2^-3.5.
                let mut slopes: Vec<f32> = (1..=8).map(|k| 2f32.powi(-k)).collect();
                slopes.extend([-0.5f32, -1.5, -2.5, -3.5].map(f32::exp2));
                VarlenParams::alibi(slopes)
            } else {
                VarlenParams::new(h)
            };
            let mut times = Vec::with_capacity(repeats);
            for _ in 0..repeats {
                let t = Instant::now();
                varlen_attention(&qkv, &cu, Some(&pos), &params, &mut out).expect("valid pack");
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{mix:9} {model:5} H={h} D={d:3} {} seqs, {total} tokens: {:8.2} ms (median of {repeats})",
                lens.len(),
                times[repeats / 2]
            );
        }
    }
}
