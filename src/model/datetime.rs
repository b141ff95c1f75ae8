//! FHIR `date`, `dateTime`, `instant` and `time` values: format checks and the time range a
//! partial value covers (`2024-03` is all of March), which date search needs.
//!
//! Written by hand rather than with a regex crate: the formats are small, and a parser can
//! also reject dates that match the pattern but do not exist (`2023-02-30`).
//!
//! Invariant: nothing here panics, whatever the input. The calendar this server represents
//! runs from [`MIN`] to [`MAX`] (years 0001–9999 in UTC, what `time` holds without its
//! `large-dates` feature and what every FHIR date can name). A valid value whose UTC form or
//! range runs past an end (`9999-12-31T23:59:59-01:00` is `10000-01-01T00:59:59Z`) is clamped
//! to that end, never wrapped: such a value is still valid FHIR and is stored as written.

use time::macros::datetime;
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// The first instant this server represents.
pub const MIN: OffsetDateTime = datetime!(0001-01-01 00:00:00 UTC);
/// The last instant this server represents.
pub const MAX: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999_999 UTC);

/// `t + d`, clamped to [`MIN`, `MAX`].
fn clamped_add(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    match t.checked_add(d) {
        Some(t) => t.clamp(MIN, MAX),
        None if d.is_negative() => MIN,
        None => MAX,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Year,
    Month,
    Day,
    /// Seconds, with `digits` digits of fraction (0 when absent).
    Second {
        digits: u8,
    },
}

/// A parsed FHIR date/dateTime/instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FhirDateTime {
    pub start: OffsetDateTime,
    pub precision: Precision,
}

impl FhirDateTime {
    /// The half-open range `[start, end)` this value denotes.
    pub fn range(&self) -> (OffsetDateTime, OffsetDateTime) {
        let end = match self.precision {
            Precision::Year => self.start.replace_year(self.start.year() + 1).unwrap_or(MAX),
            Precision::Month => {
                let (y, m) = match self.start.month() {
                    Month::December => (self.start.year() + 1, Month::January),
                    m => (self.start.year(), m.next()),
                };
                self.start.replace_year(y).and_then(|d| d.replace_month(m)).unwrap_or(MAX)
            }
            Precision::Day => clamped_add(self.start, Duration::days(1)),
            Precision::Second { digits } => {
                clamped_add(self.start, Duration::nanoseconds(10i64.pow(9 - digits.min(9) as u32)))
            }
        };
        (self.start, end)
    }
}

fn digits(s: &str, n: usize) -> Option<u32> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` (no time zone: interpreted as UTC for ranges).
pub fn parse_date(s: &str) -> Option<FhirDateTime> {
    let mut parts = s.split('-');
    let year = digits(parts.next()?, 4)? as i32;
    if year == 0 {
        return None;
    }
    let (month, precision) = match parts.next() {
        None => (1, Precision::Year),
        Some(m) => (digits(m, 2)?, Precision::Month),
    };
    let (day, precision) = match parts.next() {
        None => (1, precision),
        Some(d) => (digits(d, 2)?, Precision::Day),
    };
    if parts.next().is_some() {
        return None;
    }
    let date = Date::from_calendar_date(year, Month::try_from(month as u8).ok()?, day as u8).ok()?;
    Some(FhirDateTime { start: date.midnight().assume_utc(), precision })
}

/// A FHIR `dateTime`: a partial date, or a full date and time with seconds and a zone.
pub fn parse_date_time(s: &str) -> Option<FhirDateTime> {
    match s.split_once('T') {
        None => parse_date(s),
        Some(_) => parse_instant(s),
    }
}

/// A FHIR `instant`: `YYYY-MM-DDThh:mm:ss(.fff)?(Z|±hh:mm)`.
pub fn parse_instant(s: &str) -> Option<FhirDateTime> {
    let (date, rest) = s.split_once('T')?;
    let date = parse_date(date).filter(|d| d.precision == Precision::Day)?;
    let zone_at = rest.find(['Z', '+', '-'])?;
    let (clock, zone) = rest.split_at(zone_at);
    let (time, digits_n) = parse_clock(clock)?;
    let offset = match zone {
        "Z" => UtcOffset::UTC,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (h, m) = z[1..].split_once(':')?;
            let (h, m) = (digits(h, 2)? as i8, digits(m, 2)? as i8);
            if h > 14 || m > 59 || (h == 14 && m != 0) {
                return None;
            }
            UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
        }
    };
    let local = PrimitiveDateTime::new(date.start.date(), time);
    // The UTC form of a local time near either end of the calendar may fall outside it.
    let utc = local.assume_offset(offset).checked_to_offset(UtcOffset::UTC).unwrap_or(match offset.is_negative() {
        true => MAX,
        false => MIN,
    });
    Some(FhirDateTime { start: utc.clamp(MIN, MAX), precision: Precision::Second { digits: digits_n } })
}

/// A FHIR `time`: `hh:mm:ss(.fff)?`.
pub fn parse_time(s: &str) -> Option<Time> {
    parse_clock(s).map(|(t, _)| t)
}

fn parse_clock(s: &str) -> Option<(Time, u8)> {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    let mut it = hms.split(':');
    let h = digits(it.next()?, 2)?;
    let m = digits(it.next()?, 2)?;
    let sec = digits(it.next()?, 2)?;
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let (nanos, n) = match frac {
        None => (0, 0),
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let kept = &f[..f.len().min(9)];
            let nanos: u32 = format!("{kept:0<9}").parse().ok()?;
            (nanos, kept.len() as u8)
        }
        Some(_) => return None,
    };
    // A leap second (60) is valid FHIR; `time` cannot hold it, so clamp to :59.999999999.
    let (sec, nanos) = if sec == 60 { (59, 999_999_999) } else { (sec, nanos) };
    Some((Time::from_hms_nano(h as u8, m as u8, sec as u8, nanos).ok()?, n))
}

/// The BSON date (milliseconds) of an instant, for MongoDB queries and documents.
pub fn to_bson(t: OffsetDateTime) -> bson::DateTime {
    bson::DateTime::from_millis((t.clamp(MIN, MAX).unix_timestamp_nanos() / 1_000_000) as i64)
}

/// The BSON date of a count of milliseconds read from a request (a paging cursor), if it lies
/// in [`MIN`, `MAX`]; anything else is not a cursor this server wrote.
pub fn bson_from_millis(ms: i64) -> Option<bson::DateTime> {
    let nanos = ms as i128 * 1_000_000;
    (MIN.unix_timestamp_nanos()..=MAX.unix_timestamp_nanos()).contains(&nanos).then(|| bson::DateTime::from_millis(ms))
}

/// [`format_instant`] of a BSON date (milliseconds).
pub fn format_bson_instant(t: bson::DateTime) -> String {
    let nanos =
        (t.timestamp_millis() as i128 * 1_000_000).clamp(MIN.unix_timestamp_nanos(), MAX.unix_timestamp_nanos());
    format_instant(OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH))
}

/// Formats an instant the way this server writes `meta.lastUpdated`: UTC, milliseconds.
pub fn format_instant(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_forms() {
        for s in [
            "2024",
            "2024-02",
            "2024-02-29",
            "2024-02-29T10:11:12Z",
            "2024-02-29T10:11:12.5+05:30",
            "2016-12-31T23:59:60Z",
        ] {
            assert!(parse_date_time(s).is_some(), "{s}");
        }
        assert!(parse_instant("2024-02-29T10:11:12.123-14:00").is_some());
        assert!(parse_time("23:59:59.999").is_some());
    }

    #[test]
    fn rejects_invalid_forms() {
        for s in [
            "yesterday",
            "2023-02-29",
            "2024-13",
            "2024-1-01",
            "0000",
            "2024-01-01T10:00Z",
            "2024-01-01T10:00:00",
            "2024-01-01T25:00:00Z",
            "2024-01-01T10:00:00+15:00",
            "2024-01-01T10:00:00.Z",
            " 2024",
        ] {
            assert!(parse_date_time(s).is_none(), "{s}");
        }
        assert!(parse_instant("2024-01-01").is_none());
        assert!(parse_date("2024-01-01T10:00:00Z").is_none());
    }

    #[test]
    fn ranges_cover_the_precision() {
        let r = parse_date("2024-12").unwrap().range();
        assert_eq!(format_instant(r.0), "2024-12-01T00:00:00.000Z");
        assert_eq!(format_instant(r.1), "2025-01-01T00:00:00.000Z");
        let r = parse_instant("2024-01-01T00:00:00.12+01:00").unwrap().range();
        assert_eq!(format_instant(r.0), "2023-12-31T23:00:00.120Z");
        assert_eq!(format_instant(r.1), "2023-12-31T23:00:00.130Z");
    }

    #[test]
    fn values_at_the_ends_of_the_calendar_clamp() {
        // Each of these overflowed when converted to UTC or when its range was computed.
        for s in ["9999-12-31", "9999-12", "9999", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999999Z"] {
            let (start, end) = parse_date_time(s).unwrap().range();
            assert!(start <= end && end <= MAX, "{s}");
        }
        let late = parse_date_time("9999-12-31T23:59:59-01:00").unwrap();
        assert_eq!(late.range(), (MAX, MAX));
        let late = parse_date_time("9999-12-31T23:00:00-05:00").unwrap();
        assert_eq!(late.start, MAX);
        let early = parse_date_time("0001-01-01T00:30:00+14:00").unwrap();
        assert_eq!(early.start, MIN);
        assert_eq!(format_instant(parse_date_time("0001-01-01T00:00:00Z").unwrap().start), "0001-01-01T00:00:00.000Z");
        assert_eq!(to_bson(MAX).timestamp_millis(), 253_402_300_799_999);
    }

    #[test]
    fn cursor_millis_must_name_a_calendar_instant() {
        assert!(bson_from_millis(0).is_some());
        assert!(bson_from_millis(253_402_300_799_999).is_some());
        for ms in [i64::MAX, i64::MIN, 253_402_300_800_000, -62_135_596_800_001] {
            assert!(bson_from_millis(ms).is_none(), "{ms}");
        }
        assert_eq!(format_bson_instant(bson::DateTime::from_millis(i64::MAX)), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_bson_instant(bson::DateTime::from_millis(i64::MIN)), "0001-01-01T00:00:00.000Z");
    }

    mod properties {
        //! No input makes the parsers panic; every accepted value has an ordered range inside
        //! the calendar. `PROPTEST_CASES=1000000 cargo test --lib datetime` for a long run
        //! (`make fuzz`); CI runs the default 256 cases per property.
        use super::super::*;
        use proptest::prelude::*;

        /// Strings shaped like FHIR dates, so most cases reach the calendar arithmetic.
        fn date_like() -> impl Strategy<Value = String> {
            (
                0u32..=10_000,
                0u32..=13,
                0u32..=32,
                0u32..=25,
                0u32..=61,
                0u32..=61,
                proptest::option::of("[0-9]{0,12}"),
                prop_oneof![
                    Just("Z".to_string()),
                    (0u32..=15, 0u32..=60, any::<bool>())
                        .prop_map(|(h, m, neg)| { format!("{}{h:02}:{m:02}", if neg { '-' } else { '+' }) })
                ],
                0usize..5,
            )
                .prop_map(|(y, mo, d, h, mi, s, frac, zone, cut)| {
                    let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
                    let full = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{zone}");
                    match cut {
                        0 => format!("{y:04}"),
                        1 => format!("{y:04}-{mo:02}"),
                        2 => format!("{y:04}-{mo:02}-{d:02}"),
                        _ => full,
                    }
                })
        }

        fn check(s: &str) {
            for parsed in [parse_date_time(s), parse_instant(s), parse_date(s)].into_iter().flatten() {
                let (start, end) = parsed.range();
                assert!(MIN <= start && start <= end && end <= MAX, "{s}: {start} .. {end}");
                let _ = format_instant(start);
                let _ = to_bson(end);
            }
            let _ = parse_time(s);
        }

        proptest! {
            #[test]
            fn date_like_strings_never_panic(s in date_like()) {
                check(&s);
            }

            #[test]
            fn arbitrary_strings_never_panic(s in "\\PC{0,40}") {
                check(&s);
            }

            #[test]
            fn any_millis_formats(ms in any::<i64>()) {
                let _ = format_bson_instant(bson::DateTime::from_millis(ms));
                if let Some(t) = bson_from_millis(ms) {
                    prop_assert_eq!(t.timestamp_millis(), ms);
                }
            }
        }
    }
}
