//! Tokenizers of the model families, and the long-sequence policy.
//!
//! [`Encoder`] is a model family with its tokenizer ready: what the pipeline's workers call for
//! every sequence, whatever the family.
//!
//! * ESM-2 ([`tokenize`]): residues map to the alphabet of `virnuc_core::alphabet` (fair-esm's
//!   ESM-1b/ESM-2 alphabet), one token per character, upper or lower case. A character outside the
//!   alphabet becomes `<unk>` and is counted (fair-esm raises `KeyError` there). Each sequence is
//!   framed as `<cls> … <eos>`.
//! * DNABERT-S ([`BpeTokenizer`]): the export's `tokenizer.json`, run by Hugging Face's `tokenizers`
//!   crate — the library behind the Python `tokenizers`/`transformers` call VirNucPro makes — with
//!   truncation and padding switched off (the released file carries both at 2000; VirNucPro's
//!   `tokenizer(seq)` switches them off too) and special tokens on: `[CLS] … [SEP]`. There is no
//!   normalizer: a lowercase base or any character outside the vocabulary is `[UNK]`.

use std::path::{Path, PathBuf};

use virnuc_core::family::{FamilyTraits, TokenizerKind};
use virnuc_core::{ModelFamily, ModelMetadata, alphabet};

use crate::DataError;

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
    tokenize_into(residues, out)
}

/// [`tokenize`] into ids of any width.
fn tokenize_into<T: From<u8>>(residues: &[u8], out: &mut Vec<T>) -> usize {
    out.reserve(residues.len() + 2);
    out.push(T::from(alphabet::CLS));
    let mut unknown = 0;
    for &b in residues {
        let t = TOKEN_OF[b as usize];
        unknown += usize::from(t == alphabet::UNK);
        out.push(T::from(t));
    }
    out.push(T::from(alphabet::EOS));
    unknown
}

/// A Hugging Face `tokenizer.json` (DNABERT-S's BPE) loaded for inference.
pub struct BpeTokenizer {
    inner: tokenizers::Tokenizer,
    unk: Option<u32>,
    path: PathBuf,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("path", &self.path)
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl BpeTokenizer {
    /// Loads `path`; truncation and padding are switched off whatever the file says.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let bad = |message: String| DataError::Tokenizer {
            path: path.display().to_string(),
            message,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| bad(e.to_string()))?
            .with_padding(None);
        if inner.get_post_processor().is_none() {
            return Err(bad(
                "no post-processor: the model expects [CLS] ... [SEP] around each sequence".into(),
            ));
        }
        let unk = inner.token_to_id("[UNK]");
        Ok(Self {
            inner,
            unk,
            path: path.to_path_buf(),
        })
    }

    /// Appends the ids of `text` (special tokens included) to `out`; returns how many are `[UNK]`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<usize, String> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let ids = encoding.get_ids();
        out.extend_from_slice(ids);
        Ok(self
            .unk
            .map_or(0, |u| ids.iter().filter(|&&i| i == u).count()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[derive(Debug)]
enum Tokenizer {
    Esm2,
    Bpe(Box<BpeTokenizer>),
}

/// A model family with its tokenizer: what the workers use to turn each sequence into ids.
///
/// ```
/// let esm = virnuc_data::tokenize::Encoder::esm2();
/// let mut ids = vec![];
/// assert_eq!(esm.encode(b"MA?", &mut ids).unwrap(), 1);
/// assert_eq!(ids, vec![0, 20, 5, 3, 2]);
/// ```
#[derive(Debug)]
pub struct Encoder {
    family: ModelFamily,
    tokenizer: Tokenizer,
}

impl Encoder {
    /// ESM-2 and its alphabet.
    pub fn esm2() -> Self {
        Self {
            family: ModelFamily::Esm2,
            tokenizer: Tokenizer::Esm2,
        }
    }

    /// A family whose tokenizer is a `tokenizer.json` file (DNABERT-S).
    pub fn with_tokenizer_file(family: ModelFamily, path: &Path) -> Result<Self, DataError> {
        if family.traits().tokenizer != TokenizerKind::HfTokenizers {
            return Err(DataError::Config(format!(
                "the {family} family has no tokenizer file"
            )));
        }
        Ok(Self {
            family,
            tokenizer: Tokenizer::Bpe(Box::new(BpeTokenizer::from_file(path)?)),
        })
    }

    /// The encoder an export needs: its family, and its tokenizer file (resolved by the caller from
    /// the export folder; `None` for the ESM-2 alphabet). The vocabulary must fit the model's.
    pub fn for_model(
        meta: &ModelMetadata,
        tokenizer_file: Option<&Path>,
    ) -> Result<Self, DataError> {
        let encoder = match (meta.family.traits().tokenizer, tokenizer_file) {
            (TokenizerKind::Esm2Alphabet, _) => Self::esm2(),
            (TokenizerKind::HfTokenizers, Some(path)) => {
                Self::with_tokenizer_file(meta.family, path)?
            }
            (TokenizerKind::HfTokenizers, None) => {
                return Err(DataError::Config(format!(
                    "model {} ({}) names no tokenizer file",
                    meta.model.name, meta.family
                )));
            }
        };
        if let Tokenizer::Bpe(bpe) = &encoder.tokenizer
            && bpe.vocab_size() > meta.model.vocab_size as usize
        {
            return Err(DataError::Tokenizer {
                path: bpe.path.display().to_string(),
                message: format!(
                    "{} tokens, more than the model's vocabulary of {}",
                    bpe.vocab_size(),
                    meta.model.vocab_size
                ),
            });
        }
        Ok(encoder)
    }

    pub fn family(&self) -> ModelFamily {
        self.family
    }

    pub fn traits(&self) -> &'static FamilyTraits {
        self.family.traits()
    }

    /// Appends the ids of one sequence, special tokens included; returns how many are the unknown
    /// token. `seq` is residues (ESM-2) or bases (DNABERT-S), as the family's frame input says.
    pub fn encode(&self, seq: &[u8], out: &mut Vec<u32>) -> Result<usize, String> {
        match &self.tokenizer {
            Tokenizer::Esm2 => Ok(tokenize_into(seq, out)),
            Tokenizer::Bpe(bpe) => match std::str::from_utf8(seq) {
                Ok(text) => bpe.encode(text, out),
                // A byte that is not UTF-8 is no base either: [UNK], as Python's replacement would be.
                Err(_) => bpe.encode(&String::from_utf8_lossy(seq), out),
            },
        }
    }
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
