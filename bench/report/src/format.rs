//! How figures read in the markdown and on the charts: thousands separators for rates, the
//! unit that keeps three significant digits for latencies and sizes.

use crate::targets::Unit;

/// A figure with its unit, for tables.
pub fn value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::MessagesPerSecond => format!("{} msg/s", grouped(v)),
        Unit::ConnectionsPerSecond => format!("{} conn/s", grouped(v)),
        Unit::Microseconds => micros(v),
        Unit::Bytes => bytes(v),
        Unit::Seconds => seconds(v),
    }
}

/// A whole number with `,` between thousands: `1234567.8` → `1,234,568`.
pub fn grouped(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let rounded = v.round() as i128;
    let digits = rounded.unsigned_abs().to_string();
    // Digits are ASCII, so three bytes are three characters.
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    let sign = if rounded < 0 { "-" } else { "" };
    format!("{sign}{}", groups.join(","))
}

pub fn micros(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1_000_000.0)
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{us:.0} µs")
    }
}

pub fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

pub fn ratio(r: f64) -> String {
    format!("{r:.2}×")
}

pub fn percent(fraction: f64) -> String {
    if fraction == 0.0 {
        "0".to_owned()
    } else if fraction < 0.0001 {
        "< 0.01 %".to_owned()
    } else {
        format!("{:.2} %", fraction * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_naturally() {
        assert_eq!(grouped(1_234_567.8), "1,234,568");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(-1000.0), "-1,000");
        assert_eq!(micros(1530.0), "1.53 ms");
        assert_eq!(micros(87.4), "87 µs");
        assert_eq!(bytes(1843.0), "1.80 KiB");
        assert_eq!(seconds(0.25), "250 ms");
        assert_eq!(percent(0.0), "0");
        assert_eq!(percent(0.1234), "12.34 %");
    }
}
