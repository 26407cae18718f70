//! `virnuc-trt`: ESM-2 embeddings of FASTA files (work in progress).

fn main() {
    println!("virnuc-trt {}", env!("CARGO_PKG_VERSION"));
}
