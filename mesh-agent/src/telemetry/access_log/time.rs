//! `%START_TIME(...)%` formats: the strftime specifiers Envoy accepts, plus its `%s` (epoch
//! seconds) and `%Nf` (N fractional digits). Hand-written because the `time` crate has its
//! own format syntax, not strftime; pulling chrono in for this alone is not worth it.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

#[derive(Clone, Debug, PartialEq)]
enum Item {
    Literal(String),
    Year,
    Year2,
    Month,
    MonthAbbrev,
    Day,
    DaySpace,
    DayOfYear,
    Weekday,
    Hour,
    Minute,
    Second,
    Zone,
    ZoneName,
    Epoch,
    /// Fractional seconds with this many digits (1..=9).
    Fraction(u8),
}

/// A parsed time format.
#[derive(Clone, Debug, PartialEq)]
pub struct TimeFormat(Vec<Item>);

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

impl TimeFormat {
    pub fn parse(s: &str) -> Result<TimeFormat, String> {
        let mut items = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                lit.push(c);
                continue;
            }
            let Some(spec) = chars.next() else {
                return Err("the format ends with a lone '%'".into());
            };
            let item = match spec {
                '%' => {
                    lit.push('%');
                    continue;
                }
                'Y' => Item::Year,
                'y' => Item::Year2,
                'm' => Item::Month,
                'b' | 'h' => Item::MonthAbbrev,
                'd' => Item::Day,
                'e' => Item::DaySpace,
                'j' => Item::DayOfYear,
                'a' => Item::Weekday,
                'H' => Item::Hour,
                'M' => Item::Minute,
                'S' => Item::Second,
                'z' => Item::Zone,
                'Z' => Item::ZoneName,
                's' => Item::Epoch,
                'f' => Item::Fraction(9),
                'F' => {
                    items.extend(flush(&mut lit));
                    items.extend([
                        Item::Year,
                        Item::Literal("-".into()),
                        Item::Month,
                        Item::Literal("-".into()),
                        Item::Day,
                    ]);
                    continue;
                }
                'T' => {
                    items.extend(flush(&mut lit));
                    items.extend([
                        Item::Hour,
                        Item::Literal(":".into()),
                        Item::Minute,
                        Item::Literal(":".into()),
                        Item::Second,
                    ]);
                    continue;
                }
                d @ '1'..='9' if chars.peek() == Some(&'f') => {
                    chars.next();
                    Item::Fraction(d as u8 - b'0')
                }
                other => return Err(format!("unsupported time specifier %{other}")),
            };
            items.extend(flush(&mut lit));
            items.push(item);
        }
        items.extend(flush(&mut lit));
        Ok(TimeFormat(items))
    }

    pub fn render(&self, t: SystemTime, out: &mut String) {
        let dt = OffsetDateTime::from(t);
        let nanos = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        for item in &self.0 {
            // Writing to a String cannot fail.
            let _ = match item {
                Item::Literal(s) => {
                    out.push_str(s);
                    Ok(())
                }
                Item::Year => write!(out, "{:04}", dt.year()),
                Item::Year2 => write!(out, "{:02}", dt.year().rem_euclid(100)),
                Item::Month => write!(out, "{:02}", u8::from(dt.month())),
                Item::MonthAbbrev => {
                    out.push_str(MONTHS[usize::from(u8::from(dt.month())) - 1]);
                    Ok(())
                }
                Item::Day => write!(out, "{:02}", dt.day()),
                Item::DaySpace => write!(out, "{:2}", dt.day()),
                Item::DayOfYear => write!(out, "{:03}", dt.ordinal()),
                Item::Weekday => {
                    out.push_str(WEEKDAYS[usize::from(dt.weekday().number_days_from_monday())]);
                    Ok(())
                }
                Item::Hour => write!(out, "{:02}", dt.hour()),
                Item::Minute => write!(out, "{:02}", dt.minute()),
                Item::Second => write!(out, "{:02}", dt.second()),
                Item::Zone => {
                    out.push_str("+0000");
                    Ok(())
                }
                Item::ZoneName => {
                    out.push_str("UTC");
                    Ok(())
                }
                Item::Epoch => write!(out, "{}", dt.unix_timestamp()),
                Item::Fraction(n) => {
                    let digits = format!("{nanos:09}");
                    out.push_str(&digits[..usize::from(*n)]);
                    Ok(())
                }
            };
        }
    }
}

fn flush(lit: &mut String) -> Option<Item> {
    (!lit.is_empty()).then(|| Item::Literal(std::mem::take(lit)))
}

/// Envoy's default: `2016-04-15T20:17:00.310Z` (UTC, milliseconds).
pub fn render_default(t: SystemTime, out: &mut String) {
    let dt = OffsetDateTime::from(t);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2016-04-15T20:17:00.310Z, Envoy's documentation example.
    fn example() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_460_751_420_310)
    }

    #[test]
    fn default_is_iso8601_with_milliseconds() {
        let mut s = String::new();
        render_default(example(), &mut s);
        assert_eq!(s, "2016-04-15T20:17:00.310Z");
    }

    #[test]
    fn strftime_specifiers() {
        let mut s = String::new();
        TimeFormat::parse("%F %T.%3f %z %Z %s %a %b %e %j %y %% %6f")
            .unwrap()
            .render(example(), &mut s);
        assert_eq!(
            s,
            "2016-04-15 20:17:00.310 +0000 UTC 1460751420 Fri Apr 15 106 16 % 310000"
        );
        assert!(TimeFormat::parse("%Q").unwrap_err().contains("%Q"));
        assert!(TimeFormat::parse("abc%").is_err());
    }
}
