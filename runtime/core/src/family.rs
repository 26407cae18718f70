//! Model families: what kind of model an export is, and everything that follows from it.
//!
//! A family decides three things the rest of the runtime must not guess from a model's name:
//!
//! | family | tokenizer | pooling (done in the graph) | what a kept frame contributes |
//! |---|---|---|---|
//! | [`ModelFamily::Esm2`] | the ESM-2 alphabet, `<cls> … <eos>` | mean over residues, `<cls>`/`<eos>` excluded | its protein |
//! | [`ModelFamily::DnabertS`] | the export's BPE `tokenizer.json` (Hugging Face `tokenizers`), `[CLS] … [SEP]` | mean over all tokens, `[CLS]`/`[SEP]` included (VirNucPro's `torch.mean(hidden_states, dim=1)`) | its DNA span |
//!
//! The packer and the engines are family-agnostic: they see token ids (`i64`) and `cu_seqlens`.
//! The table above lives here and only here: code elsewhere asks the family ([`ModelFamily::traits`])
//! instead of matching on it.
//!
//! ```
//! use virnuc_core::family::{FrameInput, ModelFamily, Pooling};
//! let f: ModelFamily = "dnabert_s".parse().unwrap();
//! assert_eq!(f.traits().frame_input, FrameInput::DnaSpan);
//! assert_eq!(f.traits().pooling, Pooling::MeanAllTokens);
//! assert_eq!(ModelFamily::default(), ModelFamily::Esm2);
//! ```

use serde::{Deserialize, Serialize};

/// The kind of model an export holds (`family` in `models/*.yaml` and `model.json`; absent = ESM-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// ESM-2 protein language models (fair-esm / HF `EsmModel`), 8M to 15B.
    #[default]
    Esm2,
    /// DNABERT-S (MAGICS-LAB/DNABERT_S): MosaicBERT-style DNA model, BPE tokens, ALiBi.
    DnabertS,
}

/// How the graph pools token states into the `mean` output (`pooling` in `model.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the residues: the first and last token of each sequence are left out.
    #[default]
    MeanResidues,
    /// Mean over every token of the sequence, special tokens included.
    MeanAllTokens,
}

/// What one kept frame of a DNA chunk gives the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameInput {
    /// The frame's translation.
    Protein,
    /// The frame's DNA (VirNucPro's span under `--virnucpro-compat`, else the coded bases).
    DnaSpan,
}

/// Which tokenizer a family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per residue, [`crate::alphabet`].
    Esm2Alphabet,
    /// A Hugging Face `tokenizer.json` shipped in the export folder.
    HfTokenizers,
}

/// Everything that follows from a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyTraits {
    /// The name in YAML/JSON (`esm2`, `dnabert_s`).
    pub name: &'static str,
    /// Shown to users: "ESM-2", "DNABERT-S".
    pub display: &'static str,
    pub tokenizer: TokenizerKind,
    pub pooling: Pooling,
    pub frame_input: FrameInput,
    /// Whether protein inputs (`--mode protein`) can go to this family.
    pub reads_proteins: bool,
    /// What `lengths` in the output count (tokens between the two special tokens).
    pub length_unit: &'static str,
}

const ESM2: FamilyTraits = FamilyTraits {
    name: "esm2",
    display: "ESM-2",
    tokenizer: TokenizerKind::Esm2Alphabet,
    pooling: Pooling::MeanResidues,
    frame_input: FrameInput::Protein,
    reads_proteins: true,
    length_unit: "residues",
};

const DNABERT_S: FamilyTraits = FamilyTraits {
    name: "dnabert_s",
    display: "DNABERT-S",
    tokenizer: TokenizerKind::HfTokenizers,
    pooling: Pooling::MeanAllTokens,
    frame_input: FrameInput::DnaSpan,
    reads_proteins: false,
    length_unit: "BPE tokens",
};

impl ModelFamily {
    pub const ALL: [ModelFamily; 2] = [ModelFamily::Esm2, ModelFamily::DnabertS];

    /// The family's tokenizer, pooling rule and frame input.
    pub fn traits(self) -> &'static FamilyTraits {
        match self {
            ModelFamily::Esm2 => &ESM2,
            ModelFamily::DnabertS => &DNABERT_S,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.traits().name
    }
}

impl std::fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.traits().display)
    }
}

impl std::str::FromStr for ModelFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|f| f.as_str()).collect();
                format!("unknown model family {s:?} ({})", known.join("|"))
            })
    }
}

/// The tokenizer an export names in `model.json` (`tokenizer`): absent = the ESM-2 alphabet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenizerSpec {
    #[default]
    Esm2Alphabet,
    HfTokenizers {
        /// File name inside the export folder (`tokenizer.json`).
        file: String,
        /// sha256 of that file, hex.
        sha256: String,
    },
}

impl TokenizerSpec {
    pub fn kind(&self) -> TokenizerKind {
        match self {
            TokenizerSpec::Esm2Alphabet => TokenizerKind::Esm2Alphabet,
            TokenizerSpec::HfTokenizers { .. } => TokenizerKind::HfTokenizers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for f in ModelFamily::ALL {
            assert_eq!(f.as_str().parse::<ModelFamily>(), Ok(f));
            let json = serde_json::to_string(&f).expect("serializes");
            assert_eq!(json, format!("\"{}\"", f.as_str()));
        }
        assert!("esm".parse::<ModelFamily>().is_err());
        assert!("DNABERT-S".parse::<ModelFamily>().is_err());
    }

    #[test]
    fn tokenizer_spec_json_matches_the_exporter() {
        let hf: TokenizerSpec = serde_json::from_str(
            r#"{"kind":"hf_tokenizers","file":"tokenizer.json","sha256":"ab"}"#,
        )
        .expect("parses");
        assert_eq!(hf.kind(), TokenizerKind::HfTokenizers);
        let esm: TokenizerSpec =
            serde_json::from_str(r#"{"kind":"esm2_alphabet"}"#).expect("parses");
        assert_eq!(esm, TokenizerSpec::Esm2Alphabet);
        assert!(serde_json::from_str::<TokenizerSpec>(r#"{"kind":"bpe"}"#).is_err());
    }

    #[test]
    fn each_family_names_its_own_tokenizer_and_pooling() {
        let esm = ModelFamily::Esm2.traits();
        let dna = ModelFamily::DnabertS.traits();
        assert_eq!(
            (esm.tokenizer, esm.pooling, esm.frame_input),
            (
                TokenizerKind::Esm2Alphabet,
                Pooling::MeanResidues,
                FrameInput::Protein
            )
        );
        assert_eq!(
            (dna.tokenizer, dna.pooling, dna.frame_input),
            (
                TokenizerKind::HfTokenizers,
                Pooling::MeanAllTokens,
                FrameInput::DnaSpan
            )
        );
        assert!(esm.reads_proteins && !dna.reads_proteins);
    }
}
