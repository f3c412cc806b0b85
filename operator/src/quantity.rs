//! Kubernetes quantities as numbers of bytes, for settings the operator derives from a
//! stage's memory limit.
//!
//! A quantity is a decimal number (`128`, `1.5`, `.5`) with an optional suffix: binary
//! (`Ki Mi Gi Ti Pi Ei`, powers of 1024), decimal (`n u m k M G T P E`, powers of 1000) or a
//! decimal exponent (`e3`, `E-2`; an `E` with no number after it is exa). Kubernetes counts
//! memory in whole bytes, rounding a fraction up, and so does [`bytes`].

/// `quantity` in bytes, rounded up to a whole byte; `None` when it is not a quantity, is
/// negative, or passes `u64::MAX`.
pub fn bytes(quantity: &str) -> Option<u64> {
    let s = quantity.strip_prefix('+').unwrap_or(quantity);
    let digits = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = s.split_at(digits);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    // The number without its point, and how many of its digits were after it.
    let mut mantissa: u128 = 0;
    for d in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(d - b'0'))?;
    }
    let (binary, decimal) = scale(suffix)?;
    let decimal = decimal.checked_sub(i32::try_from(fraction.len()).ok()?)?;
    let mut value = mantissa.checked_mul(1u128.checked_shl(binary)?)?;
    if decimal >= 0 {
        value = value.checked_mul(10u128.checked_pow(decimal.unsigned_abs())?)?;
    } else {
        // A divisor past u128 leaves less than one byte: one byte, rounded up, or none.
        value = match 10u128.checked_pow(decimal.unsigned_abs()) {
            Some(divisor) => value.div_ceil(divisor),
            None => u128::from(value > 0),
        };
    }
    u64::try_from(value).ok()
}

/// A suffix as (power of two, power of ten).
fn scale(suffix: &str) -> Option<(u32, i32)> {
    let binary = |p: u32| Some((p, 0));
    let decimal = |p: i32| Some((0, p));
    match suffix {
        "" => decimal(0),
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        exponent => {
            let power = exponent
                .strip_prefix('e')
                .or_else(|| exponent.strip_prefix('E'))?;
            let unsigned = power.strip_prefix(['+', '-']).unwrap_or(power);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            decimal(power.parse().ok()?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_suffixes_are_powers_of_1024() {
        for (q, want) in [
            ("1Ki", 1 << 10),
            ("512Mi", 512 << 20),
            ("1Gi", 1 << 30),
            ("2Ti", 2 << 40),
            ("1Pi", 1 << 50),
            ("1Ei", 1 << 60),
        ] {
            assert_eq!(bytes(q), Some(want), "{q}");
        }
    }

    #[test]
    fn decimal_suffixes_are_powers_of_1000() {
        for (q, want) in [
            ("1k", 1_000),
            ("500M", 500_000_000),
            ("1G", 1_000_000_000),
            ("3T", 3_000_000_000_000),
            ("1P", 1_000_000_000_000_000),
            ("2E", 2_000_000_000_000_000_000),
        ] {
            assert_eq!(bytes(q), Some(want), "{q}");
        }
    }

    #[test]
    fn plain_numbers_and_decimal_exponents_are_bytes() {
        for (q, want) in [
            ("0", 0),
            ("128974848", 128_974_848),
            ("+1024", 1024),
            ("129e6", 129_000_000),
            ("1E3", 1_000),
            ("12e+2", 1_200),
            ("5e-1", 1),
            ("1.5e3", 1_500),
        ] {
            assert_eq!(bytes(q), Some(want), "{q}");
        }
    }

    #[test]
    fn fractions_are_rounded_up_to_a_whole_byte() {
        for (q, want) in [
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            (".5Mi", 1 << 19),
            ("1.", 1),
            ("1.0001", 2),
            ("1500m", 2),
            ("1000m", 1),
            ("1u", 1),
            ("1n", 1),
            ("0.1n", 1),
            ("0.0m", 0),
            ("1e-40", 1),
        ] {
            assert_eq!(bytes(q), Some(want), "{q}");
        }
    }

    #[test]
    fn what_is_not_a_byte_count_is_none() {
        for q in [
            "",
            "Gi",
            ".",
            "-1Gi",
            "1.2.3",
            "1gi",
            "1 Gi",
            "1GiB",
            "1e",
            "1e+",
            "1ee3",
            "1Ki5",
            "lots",
            "16Ei",
            "99999999999999999999999999999999999999999",
        ] {
            assert_eq!(bytes(q), None, "{q:?}");
        }
    }
}
