//! Kubernetes quantities (`8Gi`, `500G`, `1.5Ti`, `1e9`, `68719476736`) as
//! whole bytes, which is what the agent's flags take. The CRD's CEL rules
//! already refused what is not a quantity; this refuses what is not bytes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// `q` in bytes, rounded up to a whole byte as Kubernetes does; `field`
/// names it in the error.
pub fn bytes(field: &str, q: &Quantity) -> Result<u64, String> {
    let text = q.0.trim();
    let bad = |why: &str| format!("{field} is {text:?}, {why}; write a size such as 8Gi, 500G or 68719476736");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().map_err(|_| bad("not a quantity"))?;
            10f64.powi(power)
        }
        "m" | "u" | "n" => return Err(bad("a fraction of a byte")),
        _ => return Err(bad("not a quantity")),
    };
    let value: f64 = number.parse().map_err(|_| bad("not a quantity"))?;
    let total = (value * multiplier).ceil();
    if !(1.0..=u64::MAX as f64).contains(&total) {
        return Err(bad("not a size of at least one byte"));
    }
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> Result<u64, String> {
        bytes("ram.capacity", &Quantity(text.into()))
    }

    #[test]
    fn binary_decimal_exponent_and_plain_sizes_are_bytes() {
        assert_eq!(of("8Gi"), Ok(8 << 30));
        assert_eq!(of("1.5Ti"), Ok(3 << 39));
        assert_eq!(of("500G"), Ok(500_000_000_000));
        assert_eq!(of("1e9"), Ok(1_000_000_000));
        assert_eq!(of("68719476736"), Ok(64 << 30));
        assert_eq!(of("1.5"), Ok(2), "rounded up to a whole byte");
    }

    #[test]
    fn what_is_not_a_size_in_bytes_is_refused_naming_the_field() {
        for text in ["0", "lots", "100m", "8GB", "", "-1Gi", "1.2.3Gi"] {
            let err = of(text).expect_err(text);
            assert!(err.starts_with("ram.capacity is"), "{err}");
        }
    }
}
