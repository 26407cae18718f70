//! `str()` of a numpy float32, as VirNucPro writes its scores (`'\t'.join(map(str, probability))`
//! over a row of a float32 array).
//!
//! numpy (≥ 1.14, `scalartypes.c`, `legacy=False`) prints a float scalar with the shortest digits that
//! round-trip *as float32* (Dragon4 "unique" mode), and chooses the notation by magnitude:
//!
//! * `0`, or `1e-4 ≤ |x| < 1e16` (the float32 value compared in double precision): positional, at
//!   least one digit after the point: `0.5`, `1.0`, `0.0001`, `123456790.0`, `-0.0`;
//! * otherwise scientific, trailing zeros and a bare point trimmed, exponent signed and at least two
//!   digits: `1e-05`, `3.4567e-05`, `1e+16`, `3.4028235e+38`; note `np.float32(1e-4)` is
//!   `9.99999974e-05 < 1e-4`, so it prints `1e-04`;
//! * `nan`, `inf`, `-inf`.
//!
//! The shortest round-trip digits come from Rust's own float formatting (`{:e}` of an `f32`, which
//! is also shortest round-trip); the notation is rebuilt from them. The two differ in one case: when
//! the value lies exactly halfway between two shortest candidates (e.g. `203143.625`: `…62` or
//! `…63`), Rust rounds the last digit up and numpy's Dragon4 to the even digit (`203143.62`); we
//! detect the tie exactly and take the even one. Checked against numpy on hundreds of thousands of
//! values by `tests/e2e/test_numpy_str.py`.

use std::fmt::Write;

/// numpy's `str(np.float32(x))`.
///
/// ```
/// use virnuc_predict::numpy_str::float32_str;
/// assert_eq!(float32_str(0.5), "0.5");
/// assert_eq!(float32_str(1.0), "1.0");
/// assert_eq!(float32_str(1e-5), "1e-05");
/// assert_eq!(float32_str(3.4567e-5), "3.4567e-05");
/// assert_eq!(float32_str(1e-4), "1e-04");
/// assert_eq!(float32_str(0.99999994), "0.99999994");
/// assert_eq!(float32_str(123456789.0), "123456790.0");
/// assert_eq!(float32_str(1e16), "1e+16");
/// ```
pub fn float32_str(x: f32) -> String {
    let mut s = String::with_capacity(16);
    write_float32(&mut s, x);
    s
}

/// Appends numpy's `str(np.float32(x))` to `out`.
pub fn write_float32(out: &mut String, x: f32) {
    if x.is_nan() {
        out.push_str("nan");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "inf" } else { "-inf" });
        return;
    }
    if x.is_sign_negative() {
        out.push('-');
    }
    let a = x.abs();
    if a == 0.0 {
        out.push_str("0.0");
        return;
    }
    // Shortest round-trip digits d1 d2 … dn and decimal exponent e: a = d1.d2…dn × 10^e.
    let sci = format!("{a:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let mut digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    half_even(a, &mut digits, exp);
    let wide = f64::from(a);
    if (1e-4..1e16).contains(&wide) {
        // Positional: digits placed around the point, at least one digit on each side.
        let n = digits.len() as i32;
        if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', (int_len - n) as usize));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len as usize]);
                out.push('.');
                out.push_str(&digits[int_len as usize..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
}

/// If `a` is exactly halfway between `digits` (`d1.d2… × 10^exp`, last digit odd) and the candidate
/// one unit lower in the last place, takes the lower (even) one as numpy does.
fn half_even(a: f32, digits: &mut String, exp: i32) {
    let Some(last) = digits.bytes().last() else {
        return;
    };
    if (last - b'0').is_multiple_of(2) || digits.len() < 2 {
        return;
    }
    let Ok(d) = digits.parse::<u128>() else {
        return;
    };
    // a = m · 2^p exactly; the tie is 2a = (2d − 1) · 10^q with q the exponent of the last digit.
    let bits = a.to_bits();
    let (e, frac) = ((bits >> 23) & 0xff, u128::from(bits & 0x7f_ffff));
    let (m, p) = if e == 0 {
        (frac, -149)
    } else {
        (frac | 1 << 23, e as i32 - 150)
    };
    let q = exp - (digits.len() as i32 - 1);
    let mut left = Some(m);
    let mut right = Some(2 * d - 1);
    let shift =
        |v: Option<u128>, k: i32| v.and_then(|v| v.checked_mul(1u128.checked_shl(k as u32)?));
    let pow10 =
        |v: Option<u128>, k: i32| v.and_then(|v| v.checked_mul(10u128.checked_pow(k as u32)?));
    if p + 1 >= 0 {
        left = shift(left, p + 1);
    } else {
        right = shift(right, -(p + 1));
    }
    if q >= 0 {
        right = pow10(right, q);
    } else {
        left = pow10(left, -q);
    }
    // An overflow means a long exact expansion: no tie is possible there.
    if left.is_some() && left == right {
        let lower = (d - 1).to_string();
        *digits = lower.trim_end_matches('0').to_string();
        if digits.is_empty() {
            digits.push('0');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_examples() {
        // Values and strings as numpy 2.2 prints them.
        let cases: [(f32, &str); 18] = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (9.999e-5, "9.999e-05"),
            (1e-45, "1e-45"),
            (1e-40, "1e-40"),
            (1.175_494_4e-38, "1.1754944e-38"),
            (9.99e15, "9990000000000000.0"),
            (1.5e16, "1.5e+16"),
            (3.402_823_5e38, "3.4028235e+38"),
            (16_777_216.0, "16777216.0"),
            (1e10, "10000000000.0"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
            (f32::NAN, "nan"),
            (-0.25, "-0.25"),
            (0.000_123_4, "0.0001234"),
            (f32::from_bits(0x4846_61e8), "203143.62"), // exactly 203143.625
            (1_762_400.2, "1762400.2"),
        ];
        for (x, want) in cases {
            assert_eq!(float32_str(x), want, "{x:e}");
        }
    }

    #[test]
    fn round_trips_as_float32() {
        for bits in (0u32..0x7f80_0000).step_by(9973) {
            let x = f32::from_bits(bits);
            let s = float32_str(x);
            assert_eq!(s.parse::<f32>().ok(), Some(x), "{s}");
        }
    }
}
