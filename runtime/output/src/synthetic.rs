//! Deterministic synthetic packs for tests and the crash-test driver (`virnuc-output-synth`).
//!
//! Values are a pure function of (sequence index, position), so any run — interrupted or not, in any
//! pack order — must produce the same file, and an independent reader (the h5py check in
//! `tests/check_h5.py`) can recompute every value. Each value is `m / 2^23 - 1` for a 24-bit `m`:
//! exact in f32 and in float64, so the comparison is exact.

use virnuc_core::SequenceMeta;

/// SplitMix64 finaliser (Steele et al. 2014): a well-mixed 64-bit hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Value `k` of sequence `index`'s stream (mean uses stream 0, token `t` stream `t + 1`).
pub fn value(index: u64, stream: u64, k: u64) -> f32 {
    let m = splitmix64(splitmix64(index) ^ stream.wrapping_mul(0x1_0000_0001) ^ (k << 40)) >> 40;
    (m as f32) / (1u64 << 23) as f32 - 1.0
}

/// Residues of sequence `index`: 1 to 40, so packs vary in length like real chunks.
pub fn residues(index: u64) -> u32 {
    1 + (splitmix64(index ^ 0x5EED) % 40) as u32
}

/// Id of sequence `index`; every seventh is non-ASCII to exercise UTF-8 storage.
pub fn id(index: u64) -> String {
    if index % 7 == 3 {
        format!("contig{index}_chunk_1F2_é")
    } else {
        format!("contig{index}_chunk_1F1")
    }
}

pub fn meta(index: u64) -> SequenceMeta {
    SequenceMeta {
        index,
        record: index,
        id: id(index),
        residues: residues(index),
    }
}

/// One synthetic pack: metas, `B × H` means, `[T, H]` token states (with `<cls>`/`<eos>` rows of
/// garbage that the writer must drop) and `cu_seqlens`.
pub fn pack(indices: &[u64], hidden: usize) -> (Vec<SequenceMeta>, Vec<f32>, Vec<f32>, Vec<i32>) {
    let metas: Vec<_> = indices.iter().map(|&i| meta(i)).collect();
    let mut mean = Vec::with_capacity(indices.len() * hidden);
    let mut states = Vec::new();
    let mut cu = vec![0i32];
    for m in &metas {
        mean.extend((0..hidden as u64).map(|k| value(m.index, 0, k)));
        // <cls>: a value no residue row has, so keeping it by mistake is visible.
        states.extend(std::iter::repeat_n(99.0f32, hidden));
        for t in 0..u64::from(m.residues) {
            states.extend((0..hidden as u64).map(|k| value(m.index, t + 1, k)));
        }
        states.extend(std::iter::repeat_n(-99.0f32, hidden));
        cu.push(cu[cu.len() - 1] + m.residues as i32 + 2);
    }
    (metas, mean, states, cu)
}

/// FFD-like arrival order of `0..n`: within sliding windows of `window` indices, longest first,
/// cut into packs of 1 to `max_pack` sequences; deterministic for a `seed`.
pub fn ffd_order(n: u64, window: u64, max_pack: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut packs = Vec::new();
    let mut state = seed;
    let mut next = |bound: u64| {
        state = splitmix64(state);
        state % bound.max(1)
    };
    let mut start = 0;
    while start < n {
        let end = (start + window).min(n);
        let mut win: Vec<u64> = (start..end).collect();
        win.sort_by_key(|&i| (std::cmp::Reverse(residues(i)), i));
        let mut at = 0;
        while at < win.len() {
            let take = 1 + next(max_pack as u64) as usize;
            let stop = (at + take).min(win.len());
            packs.push(win[at..stop].to_vec());
            at = stop;
        }
        start = end;
    }
    // Neighbouring packs also swap, as packs finishing out of order on a GPU would.
    for i in 1..packs.len() {
        if next(3) == 0 {
            packs.swap(i - 1, i);
        }
    }
    packs
}
