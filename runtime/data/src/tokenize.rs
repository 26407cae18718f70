//! ESM-2 tokenizer and the long-sequence policy.
//!
//! Residues map to the alphabet of `virnuc_core::alphabet` (fair-esm's ESM-1b/ESM-2 alphabet), one
//! token per character, upper or lower case. A character outside the alphabet becomes `<unk>` and is
//! counted (fair-esm raises `KeyError` there). Each sequence is framed as `<cls> … <eos>`.

use virnuc_core::alphabet;

/// Token of each byte: the alphabet's single-character tokens in either case, else `<unk>`.
static TOKEN_OF: [u8; 256] = {
    let mut t = [alphabet::UNK; 256];
    let mut id = 0;
    while id < alphabet::TOKENS.len() {
        let s = alphabet::TOKENS[id].as_bytes();
        if s.len() == 1 {
            t[s[0] as usize] = id as u8;
            t[s[0].to_ascii_lowercase() as usize] = id as u8;
        }
        id += 1;
    }
    t
};

/// Appends `<cls> residues <eos>` to `out`; returns how many residues became `<unk>`.
///
/// ```
/// use virnuc_core::alphabet::{CLS, EOS, UNK};
/// let mut out = Vec::new();
/// assert_eq!(virnuc_data::tokenize::tokenize(b"La?", &mut out), 1);
/// assert_eq!(out, vec![CLS, 4, 5, UNK, EOS]);
/// ```
pub fn tokenize(residues: &[u8], out: &mut Vec<u8>) -> usize {
    out.reserve(residues.len() + 2);
    out.push(alphabet::CLS);
    let mut unknown = 0;
    for &b in residues {
        let t = TOKEN_OF[b as usize];
        unknown += usize::from(t == alphabet::UNK);
        out.push(t);
    }
    out.push(alphabet::EOS);
    unknown
}

/// What to do with a protein longer than `max_residues`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongPolicy {
    /// Split into consecutive windows of at most `max_residues`, named `<id>_w1`, `<id>_w2`, ….
    Split,
    /// Keep the first `max_residues` (fair-esm's `truncation_seq_length`).
    #[default]
    Truncate,
    /// Leave the sequence out (counted).
    Skip,
}

impl std::str::FromStr for LongPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "split" => Ok(Self::Split),
            "truncate" => Ok(Self::Truncate),
            "skip" => Ok(Self::Skip),
            other => Err(format!(
                "unknown long-sequence policy {other:?} (split|truncate|skip)"
            )),
        }
    }
}

/// The pieces a protein of `len` residues becomes under `policy`: residue ranges and window number
/// (`None` when the name is unchanged). Empty when the protein is skipped.
pub fn long_pieces(
    len: usize,
    max_residues: usize,
    policy: LongPolicy,
) -> impl Iterator<Item = (std::ops::Range<usize>, Option<usize>)> {
    assert!(max_residues > 0, "max_residues must be positive");
    let (count, windowed) = if len <= max_residues {
        (1, false)
    } else {
        match policy {
            LongPolicy::Split => (len.div_ceil(max_residues), true),
            LongPolicy::Truncate => (1, false),
            LongPolicy::Skip => (0, false),
        }
    };
    (0..count).map(move |k| {
        let start = k * max_residues;
        let end = (start + max_residues).min(len);
        (start..end, windowed.then_some(k + 1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_residue_token_round_trips_in_both_cases() {
        for (id, s) in alphabet::TOKENS.iter().enumerate() {
            if s.len() == 1 {
                let mut out = vec![];
                let upper = s.as_bytes()[0];
                assert_eq!(tokenize(&[upper, upper.to_ascii_lowercase()], &mut out), 0);
                assert_eq!(out, vec![alphabet::CLS, id as u8, id as u8, alphabet::EOS]);
            }
        }
        let mut out = vec![];
        assert_eq!(tokenize(b"*J1 ", &mut out), 4);
        assert_eq!(tokenize(b"", &mut out), 0);
    }

    proptest! {
        #[test]
        fn pieces_cover_or_truncate(len in 1usize..5000, max in 1usize..1100) {
            let split: Vec<_> = long_pieces(len, max, LongPolicy::Split).collect();
            prop_assert_eq!(split.iter().map(|p| p.0.len()).sum::<usize>(), len);
            prop_assert!(split.iter().all(|p| !p.0.is_empty() && p.0.len() <= max));
            let trunc: Vec<_> = long_pieces(len, max, LongPolicy::Truncate).collect();
            prop_assert_eq!(trunc.len(), 1);
            prop_assert_eq!(trunc[0].0.len(), len.min(max));
            prop_assert_eq!(long_pieces(len, max, LongPolicy::Skip).count(), usize::from(len <= max));
        }
    }
}
