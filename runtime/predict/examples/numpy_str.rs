//! Reads float32 bit patterns (hex, one a line) on stdin and prints `float32_str` of each: the
//! Rust side of `tests/e2e/test_numpy_str.py`, which compares it with numpy's `str(np.float32(x))`.

use std::io::{BufRead, Write};

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let Ok(bits) = u32::from_str_radix(line.trim(), 16) else {
            writeln!(out, "bad input {line:?}")?;
            continue;
        };
        writeln!(
            out,
            "{}",
            virnuc_predict::numpy_str::float32_str(f32::from_bits(bits))
        )?;
    }
    out.flush()
}
