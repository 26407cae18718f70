//! Token-budget autotune: representative packs, timing, and the choice of budget.
//!
//! Representative packs are synthetic `chunk500` inputs (the workload of `../shared/device/README.md`:
//! 75% of sequences 168 tokens — a 500 bp chunk translates to 166 residues — and 25% uniform in
//! 20–168), packed greedily to the budget. Timing runs whole packs through the engine after a warm-up
//! pack and counts real tokens only. The choice is the fastest budget, preferring the smaller of
//! budgets within [`NEAR_BEST`] of it (less memory, smaller losses at the end of a file, and timing
//! noise is about that size).

use std::time::Instant;

use virnuc_core::{PackedBatch, SequenceMeta, alphabet};

use crate::manifest::AutotuneRow;
use virnuc_engine::{Engine, Result};

/// Budgets within this fraction of the fastest count as equally fast.
pub const NEAR_BEST: f64 = 0.03;
/// Default candidates on a GPU.
pub const GPU_BUDGETS: [usize; 5] = [4096, 8192, 16384, 32768, 65536];
/// Default candidates on the CPU (attention memory and cache behaviour favour small packs there).
pub const CPU_BUDGETS: [usize; 4] = [1024, 2048, 4096, 8192];

/// Default candidates for a device and attention flavor. The `masked` flavor materializes a `T × T`
/// mask and score matrix per head (O(T²) memory: 5 GB a layer at 8192 tokens and 20 heads), so its
/// candidates stop where that stays small.
pub fn default_budgets(gpu: bool, attention: &str) -> Vec<usize> {
    match (gpu, attention == "masked") {
        (true, false) => GPU_BUDGETS.to_vec(),
        (false, false) => CPU_BUDGETS.to_vec(),
        (true, true) => vec![1024, 2048, 4096],
        (false, true) => vec![512, 1024, 2048],
    }
}

/// A small deterministic generator (SplitMix64): the packs must be the same on every host.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// Length in tokens (specials included) of the next chunk500-like sequence.
pub fn chunk500_length(rng: &mut SplitMix) -> usize {
    if rng.range(0, 3) < 3 {
        168
    } else {
        rng.range(20, 168)
    }
}

/// One sequence of `len` tokens: `<cls>`, random residues (the 20 standard amino acids), `<eos>`.
fn push_sequence(batch: &mut PackedBatch, rng: &mut SplitMix, index: u64, len: usize) {
    let mut tokens = Vec::with_capacity(len);
    tokens.push(alphabet::CLS);
    // ids 4..=23 are the 20 standard residues L A G V S E R T I D P K Q N F Y M H W C.
    tokens.extend((0..len - 2).map(|_| 4 + rng.range(0, 19) as u8));
    tokens.push(alphabet::EOS);
    batch.push(
        SequenceMeta {
            index,
            record: 0,
            id: format!("synthetic{index}"),
            residues: (len - 2) as u32,
        },
        &tokens,
    );
}

/// `count` packs of chunk500-like sequences, each filled greedily up to `budget` tokens and at most
/// `max_seqs` sequences. With `reserve_per_missing_seq = 3`, room is kept so that the pack can be padded
/// to exactly `max_seqs` sequences by [`pad_to_shape`] (CUDA graphs need fixed shapes).
pub fn synthetic_packs(
    budget: usize,
    count: usize,
    seed: u64,
    max_seqs: Option<usize>,
    pad_reserve: bool,
) -> Vec<PackedBatch> {
    let mut rng = SplitMix::new(seed);
    let mut index = 0u64;
    let mut packs = Vec::with_capacity(count);
    let max_seqs = max_seqs.unwrap_or(usize::MAX);
    // With padding ahead, at least one filler takes the spare tokens: the pack holds at most
    // max_seqs - 1 real sequences.
    let cap = if pad_reserve && max_seqs != usize::MAX {
        max_seqs.saturating_sub(1).max(1)
    } else {
        max_seqs
    };
    let mut pending = chunk500_length(&mut rng).min(budget);
    for _ in 0..count {
        let mut batch = PackedBatch::default();
        loop {
            let b = batch.num_sequences();
            if b >= cap {
                break;
            }
            // Tokens that padding to max_seqs sequences will need after this one (3 per filler).
            let reserve = if pad_reserve && max_seqs != usize::MAX {
                3 * (max_seqs - b - 1)
            } else {
                0
            };
            if batch.num_tokens() + pending + reserve > budget {
                break;
            }
            push_sequence(&mut batch, &mut rng, index, pending);
            index += 1;
            pending = chunk500_length(&mut rng).min(budget);
        }
        if batch.is_empty() {
            // Budget smaller than one sequence: one sequence cut to fit.
            let len = budget.clamp(3, 168);
            push_sequence(&mut batch, &mut rng, index, len);
            index += 1;
        }
        packs.push(batch);
    }
    packs
}

/// Pads `batch` to exactly `tokens` tokens and `seqs` sequences with filler sequences (`<cls>`,
/// `<pad>`-free residues, `<eos>`, each 3..=`max_len` tokens) after the real ones, so that every run
/// has the same input shapes. Real sequences keep their tokens and positions; fillers have
/// `index = u64::MAX` and id `""`. `None` when it cannot be done (too few spare tokens for the
/// fillers, too many for them, or the batch already too big).
pub fn pad_to_shape(
    batch: &PackedBatch,
    tokens: usize,
    seqs: usize,
    max_len: usize,
) -> Option<PackedBatch> {
    let t = batch.num_tokens();
    let b = batch.num_sequences();
    if t > tokens || b > seqs || max_len < 3 {
        return None;
    }
    let fillers = seqs - b;
    let spare = tokens - t;
    if fillers == 0 {
        return (spare == 0).then(|| batch.clone());
    }
    if spare < 3 * fillers || spare > fillers * max_len {
        return None;
    }
    let mut out = batch.clone();
    // Spread the spare tokens evenly: each filler gets base or base + 1 tokens (all within 3..=max_len).
    let base = spare / fillers;
    let extra = spare % fillers;
    for i in 0..fillers {
        let len = base + usize::from(i < extra);
        let mut toks = vec![5u8; len];
        toks[0] = alphabet::CLS;
        toks[len - 1] = alphabet::EOS;
        out.push(
            SequenceMeta {
                index: u64::MAX,
                record: 0,
                id: String::new(),
                residues: (len - 2) as u32,
            },
            &toks,
        );
    }
    Some(out)
}

/// Sequences per padded pack for CUDA graphs at `budget`: room for short chunk500 frames.
pub fn graph_max_seqs(budget: usize) -> usize {
    // Mean chunk500 length is ~145 tokens; 1/100 of the budget leaves room for packs of short frames.
    (budget / 100).max(1)
}

/// Times `packs` through `engine` (one warm-up run first): real tokens per second over at least
/// `min_seconds` and at least `min_packs` packs (cycling through `packs`).
pub fn measure(
    engine: &mut dyn Engine,
    packs: &[PackedBatch],
    min_seconds: f64,
    min_packs: usize,
) -> Result<(f64, usize, f64)> {
    let Some(first) = packs.first() else {
        return Ok((0.0, 0, 0.0));
    };
    engine.embed(first)?;
    let start = Instant::now();
    let mut tokens = 0usize;
    let mut runs = 0usize;
    while runs < min_packs.max(1) || start.elapsed().as_secs_f64() < min_seconds {
        let pack = &packs[runs % packs.len()];
        engine.embed(pack)?;
        tokens += pack.num_tokens();
        runs += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((tokens as f64 / seconds, runs, seconds))
}

/// The budget to use: among rows of the given CUDA-graph mode that ran, the smallest whose speed is
/// within [`NEAR_BEST`] of the fastest. `None` when none ran.
pub fn choose_budget(rows: &[AutotuneRow], cuda_graph: bool) -> Option<usize> {
    let ran: Vec<(usize, f64)> = rows
        .iter()
        .filter(|r| r.cuda_graph == cuda_graph)
        .filter_map(|r| r.tokens_per_s.map(|s| (r.budget, s)))
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .collect();
    let best = ran.iter().map(|&(_, s)| s).fold(0.0f64, f64::max);
    ran.iter()
        .filter(|&&(_, s)| s >= best * (1.0 - NEAR_BEST))
        .map(|&(b, _)| b)
        .min()
}

/// Best speed of a mode, for the CUDA-graph on/off decision.
pub fn best_speed(rows: &[AutotuneRow], cuda_graph: bool) -> Option<f64> {
    rows.iter()
        .filter(|r| r.cuda_graph == cuda_graph)
        .filter_map(|r| r.tokens_per_s)
        .fold(None, |acc, s| Some(acc.map_or(s, |a: f64| a.max(s))))
}

/// Text table of the autotune, for the build's output.
pub fn format_table(rows: &[AutotuneRow]) -> String {
    let mut s =
        String::from("budget  cuda_graph  tokens/s      packs  seconds  gpu_mem_MiB  note\n");
    for r in rows {
        s.push_str(&format!(
            "{:>6}  {:>10}  {:>12}  {:>5}  {:>7.2}  {:>11}  {}\n",
            r.budget,
            if r.cuda_graph { "on" } else { "off" },
            r.tokens_per_s
                .map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
            r.packs,
            r.seconds,
            r.gpu_memory_used_mib
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            r.error.as_deref().unwrap_or("")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(budget: usize, graph: bool, speed: Option<f64>) -> AutotuneRow {
        AutotuneRow {
            budget,
            cuda_graph: graph,
            tokens_per_s: speed,
            packs: 3,
            seconds: 1.0,
            gpu_memory_used_mib: None,
            error: speed.is_none().then(|| "out of memory".into()),
        }
    }

    #[test]
    fn fastest_budget_wins_and_near_ties_go_to_the_smaller() {
        let rows = [
            row(4096, false, Some(100.0)),
            row(8192, false, Some(150.0)),
            row(16384, false, Some(200.0)),
            row(32768, false, Some(205.0)),
            row(65536, false, None),
        ];
        // 200 is within 3% of 205: the smaller budget is kept.
        assert_eq!(choose_budget(&rows, false), Some(16384));
        let rows2 = [
            row(16384, false, Some(180.0)),
            row(32768, false, Some(205.0)),
        ];
        assert_eq!(choose_budget(&rows2, false), Some(32768));
        assert_eq!(choose_budget(&rows, true), None);
        assert_eq!(choose_budget(&[row(4096, false, None)], false), None);
        assert_eq!(best_speed(&rows, false), Some(205.0));
    }

    #[test]
    fn masked_attention_gets_small_default_budgets() {
        assert_eq!(default_budgets(true, "ort"), GPU_BUDGETS.to_vec());
        assert_eq!(default_budgets(false, "virnuc"), CPU_BUDGETS.to_vec());
        assert!(default_budgets(false, "masked").iter().all(|&b| b <= 2048));
        assert!(default_budgets(true, "masked").iter().all(|&b| b <= 4096));
    }

    #[test]
    fn chunk500_mix_has_the_documented_shape() {
        let mut rng = SplitMix::new(7);
        let lens: Vec<usize> = (0..20_000).map(|_| chunk500_length(&mut rng)).collect();
        let full = lens.iter().filter(|&&l| l == 168).count() as f64 / lens.len() as f64;
        assert!((0.74..0.78).contains(&full), "{full}");
        assert!(lens.iter().all(|&l| (20..=168).contains(&l)));
    }

    proptest! {
        /// Synthetic packs are valid packs, never over budget or max_seqs, and well filled.
        #[test]
        fn synthetic_packs_are_valid_and_full(budget in 200usize..20_000, seed in 0u64..1000) {
            let packs = synthetic_packs(budget, 4, seed, None, false);
            for p in &packs {
                prop_assert!(p.num_tokens() <= budget);
                prop_assert_eq!(p.cu_seqlens.len(), p.num_sequences() + 1);
                prop_assert_eq!(*p.cu_seqlens.last().expect("cu_seqlens") as usize, p.num_tokens());
                // Greedy filling leaves less than one longest sequence unused.
                prop_assert!(p.num_tokens() + 168 > budget, "{} of {}", p.num_tokens(), budget);
            }
        }

        /// Padding keeps the real sequences, reaches the exact shape, and every filler is valid.
        #[test]
        fn padding_reaches_the_exact_shape(budget in 300usize..20_000, seed in 0u64..1000) {
            let max_seqs = graph_max_seqs(budget).max(2);
            for p in synthetic_packs(budget, 3, seed, Some(max_seqs), true) {
                let padded = pad_to_shape(&p, budget, max_seqs, 1024);
                let padded = padded.expect("reserve makes padding feasible");
                prop_assert_eq!(padded.num_tokens(), budget);
                prop_assert_eq!(padded.num_sequences(), max_seqs);
                prop_assert_eq!(&padded.input_ids[..p.num_tokens()], &p.input_ids[..]);
                prop_assert_eq!(&padded.sequences[..p.num_sequences()], &p.sequences[..]);
                for i in p.num_sequences()..max_seqs {
                    let r = padded.token_range(i);
                    prop_assert!(r.len() >= 3 && r.len() <= 1024);
                    prop_assert_eq!(padded.input_ids[r.start], i64::from(alphabet::CLS));
                    prop_assert_eq!(padded.input_ids[r.end - 1], i64::from(alphabet::EOS));
                    prop_assert_eq!(padded.position_ids[r.start], 0);
                }
            }
        }

        /// Infeasible shapes are refused, never produced wrong.
        #[test]
        fn infeasible_padding_is_refused(extra in 0usize..5, seed in 0u64..100) {
            let p = &synthetic_packs(1000, 1, seed, None, false)[0];
            let t = p.num_tokens();
            let b = p.num_sequences();
            // One filler cannot take fewer than 3 tokens.
            prop_assert!(pad_to_shape(p, t + extra.min(2), b + 1, 1024).is_none());
            prop_assert!(pad_to_shape(p, t - 1, b + 1, 1024).is_none());
            prop_assert!(pad_to_shape(p, t + 2000, b + 1, 1024).is_none());
            prop_assert!(pad_to_shape(p, t + 1, b, 1024).is_none());
            let same = pad_to_shape(p, t, b, 1024);
            prop_assert_eq!(same.as_ref(), Some(p));
        }
    }
}
