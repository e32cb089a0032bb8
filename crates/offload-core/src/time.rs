//! Millisecond timestamps and the clock every store reads time from.
//!
//! Stores never call the system clock directly: tests swap in a
//! [`ManualClock`] to drive backoff, leases and retention deterministically.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A UTC instant with millisecond precision, serialized as RFC 3339
/// (`2026-01-15T10:30:05.123Z`), as SPEC §1 requires of every timestamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }

    #[must_use]
    pub fn saturating_sub(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(ms))
    }

    /// Time from `self` until `later`, zero if `later` is not later.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }

    /// The earliest instant a caller may give, `0000-01-01T00:00:00Z`:
    /// RFC 3339 writes a year in four digits, and an answer naming an
    /// earlier one could not be read back.
    pub const EARLIEST: Timestamp = Timestamp(-62_167_219_200_000);
    /// The latest, `9999-12-30T22:00:00Z`, the last jiff holds: it keeps
    /// every instant a date in the year 9999 or before in any offset, and
    /// so reads no later one in any form.
    pub const LATEST: Timestamp = Timestamp(253_402_207_200_000);

    /// Parses any RFC 3339 timestamp (any offset, any sub-second precision),
    /// truncating to milliseconds: what an answer holds.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_rounded(text, false)
    }

    /// Parses as [`Timestamp::parse`], a time finer than a millisecond
    /// rounded up rather than down when `up`.
    fn parse_rounded(text: &str, up: bool) -> Result<Self, String> {
        if let Some(ts) = Self::parse_rfc3339_millis(text.as_bytes()) {
            return Ok(ts);
        }
        let ts = jiff::Timestamp::from_str(text).map_err(|e| e.to_string())?;
        // `as_millisecond` drops the fraction toward zero: down after 1970,
        // already up before it, where the fraction is negative.
        let below_a_millisecond = ts.subsec_nanosecond() % 1_000_000;
        let ms = ts.as_millisecond();
        Ok(Self(if up && below_a_millisecond > 0 {
            ms + 1
        } else {
            ms
        }))
    }

    /// Parses a timestamp a caller gives (`run_at`, a list's
    /// `created_after`): RFC 3339 from [`Timestamp::EARLIEST`] to
    /// [`Timestamp::LATEST`], so that every answer that names it can be read
    /// back. The error is the rule, for a message that names the field
    /// before it.
    pub fn parse_given(text: &str) -> Result<Self, String> {
        Self::given(text, false)
    }

    /// Parses a time a task may not run before (`run_at`) as
    /// [`Timestamp::parse_given`] does, but one finer than a millisecond
    /// rounds up: rounded down, a task given `…05.123456Z` came due at
    /// `…05.123Z` and a waiting worker could have it before the time given.
    pub fn parse_given_not_before(text: &str) -> Result<Self, String> {
        Self::given(text, true)
    }

    fn given(text: &str, round_up: bool) -> Result<Self, String> {
        let parsed = match Self::parse_rounded(text, round_up) {
            Ok(ts) => ts,
            Err(_) if is_past_jiffs_range(text) => return Err(out_of_range(text)),
            Err(e) => {
                return Err(format!(
                    "must be an RFC 3339 timestamp such as 2026-01-15T10:30:05.123Z ({e})"
                ));
            }
        };
        if !(Self::EARLIEST..=Self::LATEST).contains(&parsed) {
            return Err(out_of_range(text));
        }
        Ok(parsed)
    }

    /// The form [`Timestamp::rfc3339`] writes, `2026-01-15T10:00:00.000Z`,
    /// read without jiff: a worker parses several in every task it fetches.
    /// Anything else, or a date that does not exist, is left to jiff.
    pub(crate) fn parse_rfc3339_millis(text: &[u8]) -> Option<Self> {
        let [
            y0,
            y1,
            y2,
            y3,
            b'-',
            m0,
            m1,
            b'-',
            d0,
            d1,
            b'T',
            h0,
            h1,
            b':',
            i0,
            i1,
            b':',
            s0,
            s1,
            b'.',
            f0,
            f1,
            f2,
            b'Z',
        ] = *text
        else {
            return None;
        };
        let digits = |ds: &[u8]| -> Option<i64> {
            ds.iter().try_fold(0i64, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
            })
        };
        let year = digits(&[y0, y1, y2, y3])?;
        let month = digits(&[m0, m1])?;
        let day = digits(&[d0, d1])?;
        let (hour, minute, second) = (digits(&[h0, h1])?, digits(&[i0, i1])?, digits(&[s0, s1])?);
        let millis = digits(&[f0, f1, f2])?;
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if year < 1970
            || !(1..=month_days).contains(&day)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        // The inverse of the civil-date arithmetic in `rfc3339`: years
        // counted from March, in 400-year eras.
        let shifted_year = if month <= 2 { year - 1 } else { year };
        let era = shifted_year / 400;
        let year_of_era = shifted_year - era * 400;
        let shifted_month = if month > 2 { month - 3 } else { month + 9 };
        let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        let days = era * 146_097 + day_of_era - 719_468;
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
        Some(Self(secs * 1000 + millis))
    }
}

/// Whether `text` is a whole timestamp, offset and all, in one of the
/// years at the ends of jiff's range: well formed, but past what jiff
/// holds, where jiff's own message speaks of an overflow.
fn is_past_jiffs_range(text: &str) -> bool {
    jiff::fmt::temporal::Pieces::parse(text).is_ok_and(|pieces| {
        let year = pieces.date().year();
        pieces.offset().is_some() && pieces.time().is_some() && !(-9998..=9998).contains(&year)
    })
}

fn out_of_range(text: &str) -> String {
    format!("must be from 0000-01-01T00:00:00Z to 9999-12-30T22:00:00Z; got {text:?}")
}

impl Timestamp {
    /// RFC 3339 in UTC with milliseconds, `2026-01-15T10:00:00.000Z`, for
    /// years 1970 to 9999. Hand-rolled because every task in every answer
    /// carries several timestamps; jiff's general formatter showed in
    /// profiles of large answers.
    pub(crate) fn rfc3339(self) -> Option<[u8; 24]> {
        const LAST_MS_OF_9999: i64 = 253_402_300_799_999;
        if !(0..=LAST_MS_OF_9999).contains(&self.0) {
            return None;
        }
        let millis = self.0 % 1000;
        let secs = self.0 / 1000;
        let (days, second_of_day) = (secs / 86_400, secs % 86_400);
        // Days since 1970-01-01 to a civil date (the proleptic Gregorian
        // calendar, in 400-year eras that start on March 1st).
        let z = days + 719_468;
        let era = z / 146_097;
        let day_of_era = z - era * 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let shifted_month = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
        let month = if shifted_month < 10 {
            shifted_month + 3
        } else {
            shifted_month - 9
        };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: i64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, second_of_day / 3600);
        put(14, 2, second_of_day / 60 % 60);
        put(17, 2, second_of_day % 60);
        put(20, 3, millis);
        Some(out)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(text) = self.rfc3339() {
            // Only ASCII digits and separators were written.
            return f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?);
        }
        match jiff::Timestamp::from_millisecond(self.0) {
            Ok(ts) => write!(f, "{}", ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")),
            Err(_) => write!(f, "invalid-timestamp({})", self.0),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.rfc3339() {
            Some(text) => {
                s.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
            }
            None => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `Cow<str>`, whose Deserialize always copies
        // into a String.
        struct Rfc3339;
        impl serde::de::Visitor<'_> for Rfc3339 {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Timestamp, E> {
                Timestamp::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Rfc3339)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("UTC, RFC 3339 with milliseconds"))
            .examples([serde_json::json!("2026-01-15T10:30:05.123Z")])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Timestamp {}

/// Where stores read "now" from.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.as_millis()))
    }

    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_milliseconds_in_utc() {
        let ts = Timestamp::parse("2026-01-15T11:30:05.1234+01:00").unwrap();
        assert_eq!(ts.to_string(), "2026-01-15T10:30:05.123Z");
        let whole = Timestamp::parse("2026-01-15T10:30:05Z").unwrap();
        assert_eq!(whole.to_string(), "2026-01-15T10:30:05.000Z");
    }

    #[test]
    fn a_time_not_to_run_before_rounds_a_fraction_of_a_millisecond_up() {
        let not_before = |text| Timestamp::parse_given_not_before(text).unwrap().to_string();
        assert_eq!(
            not_before("2026-01-15T10:30:05.123001Z"),
            "2026-01-15T10:30:05.124Z"
        );
        assert_eq!(
            not_before("2026-01-15T11:30:05.9999+01:00"),
            "2026-01-15T10:30:06.000Z"
        );
        // Whole milliseconds, in any form, stay as they are.
        assert_eq!(
            not_before("2026-01-15T10:30:05.123000Z"),
            "2026-01-15T10:30:05.123Z"
        );
        assert_eq!(
            not_before("2026-01-15T10:30:05.123Z"),
            "2026-01-15T10:30:05.123Z"
        );
        assert_eq!(
            not_before("2026-01-15T10:30:05Z"),
            "2026-01-15T10:30:05.000Z"
        );
        // Before 1970 the fraction is dropped toward the later time already.
        let early = Timestamp::parse_given_not_before("1969-12-31T23:59:59.9995Z").unwrap();
        assert_eq!(early.as_millis(), 0);
        // Rounded up past the latest time an answer can name, it is refused.
        assert!(Timestamp::parse_given_not_before("9999-12-30T22:00:00.0001Z").is_err());
        assert!(Timestamp::parse_given("9999-12-30T22:00:00.0001Z").is_ok());
        // Other times given (a list's bounds) still round down.
        let bound = Timestamp::parse_given("2026-01-15T10:30:05.123001Z").unwrap();
        assert_eq!(bound.to_string(), "2026-01-15T10:30:05.123Z");
    }

    #[test]
    fn fast_format_agrees_with_jiff() {
        let jiff_format = |ms: i64| {
            jiff::Timestamp::from_millisecond(ms)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string()
        };
        // The last instant jiff formats (it keeps room for time zone offsets).
        let last = 253_402_207_200_000_i64;
        // Edges (epoch, leap days, century rules, the last millisecond of
        // 9999) and a spread of millions of values in between.
        let mut samples = vec![
            0,
            1,
            999,
            86_399_999,
            951_782_400_000,
            4_107_542_400_000,
            last,
        ];
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x.rem_euclid(last + 1));
        }
        for ms in samples {
            let ts = Timestamp::from_millis(ms);
            let text = jiff_format(ms);
            assert_eq!(ts.to_string(), text, "{ms}");
            assert_eq!(serde_json::to_string(&ts).unwrap(), format!("\"{text}\""));
            // And back: the fast reader agrees with jiff's.
            assert_eq!(
                Timestamp::parse_rfc3339_millis(text.as_bytes()),
                Some(ts),
                "{text}"
            );
            assert_eq!(
                serde_json::from_str::<Timestamp>(&format!("\"{text}\"")).unwrap(),
                ts
            );
        }
        // Outside 1970..=9999 it still formats, through jiff.
        assert_eq!(
            Timestamp::from_millis(-1).to_string(),
            "1969-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn takes_only_instants_an_answer_can_write_back() {
        for (text, at) in [
            ("0000-01-01T00:00:00Z", Timestamp::EARLIEST),
            ("9999-12-30T22:00:00Z", Timestamp::LATEST),
            ("9999-12-31T00:00:00+02:00", Timestamp::LATEST),
            (
                "1969-07-20T20:17:40Z",
                Timestamp::from_millis(-14_182_940_000),
            ),
        ] {
            assert_eq!(Timestamp::parse_given(text), Ok(at), "{text}");
            let written = at.to_string();
            assert_eq!(Timestamp::parse(&written), Ok(at), "{written}");
        }
        for text in [
            "-000001-06-01T00:00:00Z",
            "-009999-01-02T00:00:00Z",
            "9999-12-30T22:00:00.001Z",
            "9999-12-31T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
        ] {
            let rule = Timestamp::parse_given(text).expect_err(text);
            assert_eq!(
                rule,
                format!("must be from 0000-01-01T00:00:00Z to 9999-12-30T22:00:00Z; got {text:?}")
            );
        }
        // Not a timestamp, or not a whole one: the rule of the form.
        for text in [
            "tomorrow",
            "2026-01-15T10:00:00",
            "2026-01-15",
            "2026-02-30T10:00:00Z",
        ] {
            let rule = Timestamp::parse_given(text).expect_err(text);
            assert!(
                rule.starts_with("must be an RFC 3339 timestamp such as"),
                "{text}: {rule}"
            );
        }
    }

    #[test]
    fn rejects_text_that_is_not_rfc3339() {
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("2026-01-15").is_err());
        // Of the fast reader's shape, but no such instant: jiff says why.
        for text in [
            "2026-02-29T10:00:00.000Z",
            "2026-13-01T10:00:00.000Z",
            "2026-01-15T24:00:00.000Z",
            "2026-01-15T10:60:00.000Z",
            "2026-01-1xT10:00:00.000Z",
        ] {
            assert_eq!(
                Timestamp::parse_rfc3339_millis(text.as_bytes()),
                None,
                "{text}"
            );
            assert!(Timestamp::parse(text).is_err(), "{text}");
        }
        // A leap day exists, and both readers agree on it.
        assert_eq!(
            Timestamp::parse("2024-02-29T23:59:59.999Z").unwrap(),
            Timestamp::parse_rfc3339_millis(b"2024-02-29T23:59:59.999Z").unwrap()
        );
    }
}
