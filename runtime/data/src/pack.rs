//! Token-budget packing: First-Fit Decreasing over a sliding window of sequences.
//!
//! [`first_fit_decreasing`] is the pure algorithm (sizes in, bins of item indices out). [`Packer`]
//! applies it to a stream: it collects `window` sequences, packs them, emits every pack but the
//! least-filled one, whose sequences go back into the next window so that the tail of each window is
//! not shipped half empty. A sequence is carried at most once, so a sequence leaves the packer at most
//! two windows after it entered: a consumer that restores input order needs a reorder buffer of about
//! `2 · window` sequences, whatever the input size. A sequence longer than the budget goes alone in
//! its own pack (counted as oversize), never dropped.

use virnuc_core::{PackedBatch, SequenceMeta};

/// Bins of item indices, by First-Fit Decreasing: items taken longest first (ties: lower index first),
/// each into the first bin where it fits (`size ≤ budget − fill` and fewer than `max_seqs` items),
/// else into a new bin. An item larger than `budget` gets a bin of its own that takes nothing else.
/// Items within a bin are in index order; bins are ordered by their first item.
///
/// ```
/// let bins = virnuc_data::pack::first_fit_decreasing(&[6, 5, 4, 3, 2], 10, None);
/// assert_eq!(bins, vec![vec![0, 2], vec![1, 3, 4]]);
/// ```
pub fn first_fit_decreasing(
    sizes: &[usize],
    budget: usize,
    max_seqs: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let max_seqs = max_seqs.unwrap_or(usize::MAX).max(1);
    // Remaining room per bin; an oversize bin has room 0 so nothing else enters it.
    let mut room: Vec<usize> = Vec::new();
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let s = sizes[i];
        let slot = if s > budget {
            None
        } else {
            (0..bins.len()).find(|&b| room[b] >= s && bins[b].len() < max_seqs)
        };
        match slot {
            Some(b) => {
                room[b] -= s;
                bins[b].push(i);
            }
            None => {
                room.push(budget.saturating_sub(s));
                bins.push(vec![i]);
            }
        }
    }
    for bin in &mut bins {
        bin.sort_unstable();
    }
    bins.sort_unstable_by_key(|b| b[0]);
    bins
}

/// One tokenized sequence waiting for a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackItem {
    pub meta: SequenceMeta,
    /// The ids, special tokens included (`<cls> … <eos>`, `[CLS] … [SEP]`).
    pub tokens: Vec<u32>,
}

/// Packer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackerConfig {
    /// Tokens per pack, `<cls>`/`<eos>` included.
    pub budget: usize,
    pub max_seqs: Option<usize>,
    /// Sequences considered together by FFD.
    pub window: usize,
}

/// Counters of what the packer emitted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackStats {
    pub packs: u64,
    pub sequences: u64,
    /// Tokens in packs, special tokens included.
    pub tokens: u64,
    /// Residues in packs (tokens minus `<cls>`/`<eos>`).
    pub residues: u64,
    /// Σ over packs of `budget − tokens` (0 for an oversize pack): the padding a fixed-shape engine
    /// would add.
    pub unused_budget: u64,
    /// Packs holding a single sequence longer than the budget.
    pub oversize_packs: u64,
    /// Largest pack, in tokens.
    pub max_pack_tokens: u64,
}

#[derive(Debug)]
struct Pending {
    item: PackItem,
    carried: bool,
}

/// Streaming FFD packer (see the module docs).
#[derive(Debug)]
pub struct Packer {
    config: PackerConfig,
    pending: Vec<Pending>,
    stats: PackStats,
}

impl Packer {
    pub fn new(config: PackerConfig) -> Self {
        assert!(
            config.budget > 0 && config.window > 0,
            "budget and window must be positive"
        );
        Self {
            config,
            pending: Vec::with_capacity(config.window),
            stats: PackStats::default(),
        }
    }

    /// Adds a sequence; appends to `out` the packs that became ready.
    pub fn push(&mut self, item: PackItem, out: &mut Vec<PackedBatch>) {
        self.pending.push(Pending {
            item,
            carried: false,
        });
        if self.pending.len() >= self.config.window {
            self.pack(false, out);
        }
    }

    /// Packs everything still pending.
    pub fn finish(&mut self, out: &mut Vec<PackedBatch>) {
        if !self.pending.is_empty() {
            self.pack(true, out);
        }
    }

    pub fn stats(&self) -> &PackStats {
        &self.stats
    }

    /// Sequences held, waiting for a pack.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn pack(&mut self, last: bool, out: &mut Vec<PackedBatch>) {
        let sizes: Vec<usize> = self.pending.iter().map(|p| p.item.tokens.len()).collect();
        let bins = first_fit_decreasing(&sizes, self.config.budget, self.config.max_seqs);
        let fill = |bin: &Vec<usize>| bin.iter().map(|&i| sizes[i]).sum::<usize>();
        let carry = if last {
            None
        } else {
            bins.iter()
                .enumerate()
                .filter(|(_, b)| {
                    fill(b) < self.config.budget
                        && self.config.max_seqs.is_none_or(|m| b.len() < m)
                        && b.iter().all(|&i| !self.pending[i].carried)
                })
                .min_by_key(|(k, b)| (fill(b), std::cmp::Reverse(*k)))
                .map(|(k, _)| k)
        };
        let mut slots: Vec<Option<Pending>> = self.pending.drain(..).map(Some).collect();
        for (k, bin) in bins.iter().enumerate() {
            if Some(k) == carry {
                continue;
            }
            let tokens = fill(bin);
            let mut batch = PackedBatch {
                input_ids: Vec::with_capacity(tokens),
                position_ids: Vec::with_capacity(tokens),
                cu_seqlens: Vec::with_capacity(bin.len() + 1),
                ..PackedBatch::default()
            };
            batch.cu_seqlens.push(0);
            for &i in bin {
                if let Some(p) = slots[i].take() {
                    self.stats.residues += p.item.tokens.len().saturating_sub(2) as u64;
                    batch.push(p.item.meta, &p.item.tokens);
                }
            }
            self.stats.packs += 1;
            self.stats.sequences += batch.num_sequences() as u64;
            self.stats.tokens += tokens as u64;
            self.stats.max_pack_tokens = self.stats.max_pack_tokens.max(tokens as u64);
            if tokens > self.config.budget {
                self.stats.oversize_packs += 1;
            } else {
                self.stats.unused_budget += (self.config.budget - tokens) as u64;
            }
            out.push(batch);
        }
        if let Some(k) = carry {
            for &i in &bins[k] {
                if let Some(mut p) = slots[i].take() {
                    p.carried = true;
                    self.pending.push(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virnuc_core::alphabet;

    fn item(index: u64, residues: usize) -> PackItem {
        let mut tokens = vec![u32::from(alphabet::CLS)];
        tokens.extend(std::iter::repeat_n(5u32, residues));
        tokens.push(u32::from(alphabet::EOS));
        PackItem {
            meta: SequenceMeta {
                index,
                record: 0,
                id: format!("s{index}"),
                residues: residues as u32,
            },
            tokens,
        }
    }

    fn run(lengths: &[usize], config: PackerConfig) -> (Vec<PackedBatch>, PackStats) {
        let mut packer = Packer::new(config);
        let mut out = vec![];
        for (i, &l) in lengths.iter().enumerate() {
            let before = out.len();
            packer.push(item(i as u64, l), &mut out);
            // Bounded memory: never more than a window plus one carried pack's sequences.
            assert!(packer.pending() <= 2 * config.window);
            // Bounded reorder distance: a sequence leaves within two windows of entering.
            for p in &out[before..] {
                for s in &p.sequences {
                    assert!(
                        i as u64 - s.index < 2 * config.window as u64,
                        "{i} {}",
                        s.index
                    );
                }
            }
        }
        packer.finish(&mut out);
        (out, packer.stats().clone())
    }

    #[test]
    fn oversize_sequence_goes_alone() {
        let (packs, stats) = run(
            &[5, 100, 5],
            PackerConfig {
                budget: 50,
                max_seqs: None,
                window: 8,
            },
        );
        assert_eq!(packs.len(), 2);
        assert_eq!(stats.oversize_packs, 1);
        let big = packs
            .iter()
            .find(|p| p.num_tokens() == 102)
            .expect("oversize pack");
        assert_eq!(big.num_sequences(), 1);
    }

    #[test]
    fn utilization_on_chunk500_like_lengths() {
        // Stop-free frames of 500 bp chunks are 164..166 residues; budget 16384.
        let lengths: Vec<usize> = (0..20_000).map(|i| 160 + (i * 7919) % 7).collect();
        let (_, stats) = run(
            &lengths,
            PackerConfig {
                budget: 16384,
                max_seqs: None,
                window: 4096,
            },
        );
        let util = stats.tokens as f64 / (stats.tokens + stats.unused_budget) as f64;
        assert!(util > 0.98, "{util}");
    }

    proptest! {
        #[test]
        fn packs_are_consistent(
            lengths in prop::collection::vec(0usize..300, 0..400),
            budget in 16usize..1200,
            max_seqs in prop::option::of(1usize..20),
            window in 1usize..64,
        ) {
            let config = PackerConfig { budget, max_seqs, window };
            let (packs, stats) = run(&lengths, config);
            let mut seen = vec![0u32; lengths.len()];
            let mut tokens = 0;
            for p in &packs {
                prop_assert!(!p.is_empty());
                // Budget: only a single oversize sequence may exceed it.
                prop_assert!(p.num_tokens() <= budget || p.num_sequences() == 1);
                if let Some(m) = max_seqs { prop_assert!(p.num_sequences() <= m); }
                // cu_seqlens / position_ids consistent with the sequences.
                prop_assert_eq!(p.cu_seqlens[0], 0);
                prop_assert_eq!(*p.cu_seqlens.last().unwrap_or(&-1) as usize, p.num_tokens());
                prop_assert_eq!(p.position_ids.len(), p.input_ids.len());
                prop_assert_eq!(p.cu_seqlens.len(), p.num_sequences() + 1);
                for (i, s) in p.sequences.iter().enumerate() {
                    let r = p.token_range(i);
                    prop_assert_eq!(r.len(), lengths[s.index as usize] + 2);
                    prop_assert_eq!(p.input_ids[r.start], i64::from(alphabet::CLS));
                    prop_assert_eq!(p.input_ids[r.end - 1], i64::from(alphabet::EOS));
                    let pos: Vec<i64> = p.position_ids[r.clone()].to_vec();
                    prop_assert_eq!(pos, (0..r.len() as i64).collect::<Vec<_>>());
                    prop_assert_eq!(p.max_seqlen >= r.len(), true);
                    seen[s.index as usize] += 1;
                }
                tokens += p.num_tokens();
            }
            // Every sequence in exactly one pack; the order map (index) restores input order.
            prop_assert!(seen.iter().all(|&c| c == 1));
            let mut order: Vec<u64> = packs.iter().flat_map(|p| p.sequences.iter().map(|s| s.index)).collect();
            order.sort_unstable();
            prop_assert_eq!(order, (0..lengths.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!(stats.tokens as usize, tokens);
            prop_assert_eq!(stats.sequences as usize, lengths.len());
            prop_assert_eq!(stats.packs as usize, packs.len());
        }

        #[test]
        fn ffd_bins_respect_budget(sizes in prop::collection::vec(1usize..100, 0..200), budget in 1usize..300) {
            let bins = first_fit_decreasing(&sizes, budget, None);
            let mut all: Vec<usize> = bins.concat();
            all.sort_unstable();
            prop_assert_eq!(all, (0..sizes.len()).collect::<Vec<_>>());
            for b in &bins {
                let fill: usize = b.iter().map(|&i| sizes[i]).sum();
                prop_assert!(fill <= budget || b.len() == 1);
            }
            // FFD is within 11/9 OPT + 1 bins; OPT ≥ ceil(total / budget) for fitting items.
            let fitting: usize = sizes.iter().filter(|&&s| s <= budget).sum();
            let oversize = sizes.iter().filter(|&&s| s > budget).count();
            let lower = fitting.div_ceil(budget);
            prop_assert!(bins.len() - oversize <= (11 * lower).div_ceil(9) + 1);
        }
    }
}
