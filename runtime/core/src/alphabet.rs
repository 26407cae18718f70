//! The ESM-2 alphabet (fair-esm `esm.data.Alphabet.from_architecture("ESM-1b")`, HF `EsmTokenizer`).

pub const CLS: u8 = 0;
pub const PAD: u8 = 1;
pub const EOS: u8 = 2;
pub const UNK: u8 = 3;
pub const MASK: u8 = 32;

/// Token strings by id.
pub const TOKENS: [&str; 33] = [
    "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K",
    "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>",
    "<mask>",
];
