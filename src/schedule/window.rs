//! The nightly blackout: a daily wall-clock window in an IANA time zone in
//! which no cycle starts.
//!
//! Operators think of the blackout as "01:30 to 03:00 Berlin time", because
//! that is when the tenant's own nightly jobs (backups, index maintenance)
//! run. So the window is configured in wall-clock time and a zone, not in
//! UTC, and it has to follow the zone through daylight-saving changes.
//!
//! # Semantics
//!
//! The window of local date `D` is one continuous real-time interval
//! `[from, to)`:
//!
//! * `from` is the **earliest** instant whose wall-clock reading is `start`
//!   on `D`;
//! * `to` is the **latest** instant whose wall-clock reading is `end` on `D`,
//!   or on `D + 1` when `end` is before `start` (the window crosses
//!   midnight: 23:00–01:00 runs from 23:00 on `D` to 01:00 on `D + 1`).
//!
//! Taking the earliest start and the latest end makes the window as long as
//! it can be, never shorter than either reading: the blackout protects the
//! tenant's nightly jobs, and those jobs are scheduled in wall-clock time
//! too, so when the clock shows a time twice the jobs may run at either
//! reading. Because the interval is continuous, a wall-clock hour that is
//! repeated on a fall-back night is inside the window even if its readings
//! are before `start` (New York, 2026-11-01, 01:30–03:00: from 01:30 EDT to
//! 03:00 EST, 2h30 of real time, including the second 01:00–01:30 in EST).
//!
//! When a reading does not exist that day (the spring-forward gap), the
//! first instant after the gap stands in for it, i.e. the transition
//! instant itself. The clock jumps from just before the gap to just after
//! it, so that instant is where the missing reading "would have been"; for
//! the start it means the blackout begins as soon as the clock has passed
//! `start`, for the end that the blackout is over as soon as it has passed
//! `end`. Examples, 01:30–03:00:
//!
//! | night                          | from       | to         | real length |
//! |--------------------------------|------------|------------|-------------|
//! | Europe/Berlin, 2026-03-29      | 01:30 CET  | 03:00 CEST | 30 min      |
//! | Europe/Berlin, 2026-10-25      | 01:30 CEST | 03:00 CET  | 2h30        |
//! | America/New_York, 2026-03-08   | 01:30 EST  | 03:00 EDT  | 30 min      |
//! | America/New_York, 2026-11-01   | 01:30 EDT  | 03:00 EST  | 2h30        |
//!
//! If both readings fall into the same gap (a window 02:00–02:45 on a night
//! the clock jumps from 02:00 to 03:00) the window is empty that night:
//! there is no blackout, as none of its wall-clock minutes happen.
//!
//! In pathological zones or for very long windows, the window of one date
//! may reach into the next one (a 02:30–02:00 window on a fall-back night).
//! Such windows are treated as one, so [`Blackout::next_open`] never lands
//! inside a blackout.

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::fmt;

/// Why a blackout configuration was refused. The message names the bad
/// value, since it ends up in front of an operator editing a config file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct WindowError(pub String);

/// A nightly window in which no replication cycle may start (and a running
/// one stops at the next batch boundary), see the module documentation for
/// how it behaves across DST changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackout {
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub zone: Tz,
}

/// How far to look for the end of a spring-forward gap. Real gaps last an
/// hour or less; the longest on record (Pacific/Apia skipping 2011-12-30)
/// is a whole day, so two days is plenty.
const MAX_GAP_MINUTES: u32 = 48 * 60;

/// How many neighbouring nights may be merged into one window. Only very
/// long windows on DST nights touch their neighbour at all.
const MAX_MERGED_NIGHTS: u32 = 3;

/// How many nights [`Blackout::next_start`] looks ahead. Every night has a
/// window except one whose readings fall into a gap, so one or two suffice.
const MAX_SCAN_NIGHTS: u32 = 14;

/// Which instant to take when the wall clock shows a reading twice.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Earliest,
    Latest,
}

impl Blackout {
    /// Reads the operator's configuration. Times are strictly `HH:MM` or
    /// `HH:MM:SS` on a 24-hour clock: a lenient parser would quietly turn a
    /// typo into a different window, and a wrong blackout is only noticed
    /// when a cycle collides with the tenant's nightly jobs.
    pub fn parse(start: &str, end: &str, zone: &str) -> Result<Self, WindowError> {
        let start_time = parse_time_of_day("start", start)?;
        let end_time = parse_time_of_day("end", end)?;
        let tz = zone.parse::<Tz>().map_err(|_| {
            WindowError(format!("unknown time zone {:?}: use an IANA name such as \"Europe/Berlin\"", shorten(zone)))
        })?;
        if start_time == end_time {
            // Equal times could mean "never" or "all day"; neither is a
            // useful blackout, so ask rather than guess.
            return Err(WindowError(format!(
                "blackout start and end are both {}: the window would be empty",
                TimeOfDay(start_time)
            )));
        }
        Ok(Self { start: start_time, end: end_time, zone: tz })
    }

    /// The blackout window `[from, to)` that contains `t`, or `None` when
    /// `t` is outside every window. Windows of neighbouring nights that
    /// touch or overlap are returned as one.
    pub fn window_at(&self, t: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let day = self.local_date(t)?;
        // The window containing t started on t's local date or the day
        // before; the day after is checked too because on a fall-back that
        // crosses midnight the local date of t can lag behind its window's.
        let (night, mut from, mut to) =
            [day.pred_opt(), Some(day), day.succ_opt()].into_iter().flatten().find_map(|d| {
                self.window_of(d).filter(|&(from, to)| from <= t && t < to).map(|(from, to)| (d, from, to))
            })?;

        let mut earlier = night;
        for _ in 0..MAX_MERGED_NIGHTS {
            let Some(d) = earlier.pred_opt() else { break };
            earlier = d;
            match self.window_of(d) {
                Some((f, e)) if f < from && e >= from => from = f,
                _ => break,
            }
        }
        let mut later = night;
        for _ in 0..MAX_MERGED_NIGHTS {
            let Some(d) = later.succ_opt() else { break };
            later = d;
            match self.window_of(d) {
                Some((f, e)) if f <= to && e > to => to = e,
                _ => break,
            }
        }
        Some((from, to))
    }

    /// Whether no cycle may start at `t`. Defined through [`Self::window_at`]
    /// so the two can never disagree about a boundary.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.window_at(t).is_some()
    }

    /// The first instant at or after `t` at which a cycle may start: the
    /// end of the window containing `t` (window ends are exclusive, so that
    /// instant is already open), or `t` itself outside the blackout.
    pub fn next_open(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.window_at(t).map(|w| w.1).unwrap_or(t)
    }

    /// The start of the first window that begins strictly after `t`: the
    /// moment a running cycle has to stop. Nights whose window is empty
    /// (both readings inside a DST gap) are skipped, since there is nothing
    /// to stop for. If no window starts within two weeks (impossible with
    /// real zone data) the answer is "never", [`DateTime::<Utc>::MAX_UTC`].
    pub fn next_start(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let Some(mut day) = self.local_date(t) else { return DateTime::<Utc>::MAX_UTC };
        day = day.pred_opt().unwrap_or(day);
        for _ in 0..MAX_SCAN_NIGHTS {
            // Window starts grow with their date (one day apart, give or
            // take a DST shift), so the first one after t is the answer.
            if let Some((from, _)) = self.window_of(day) {
                if from > t {
                    return from;
                }
            }
            match day.succ_opt() {
                Some(d) => day = d,
                None => break,
            }
        }
        DateTime::<Utc>::MAX_UTC
    }

    /// The window of local date `date`, `None` when it is empty (both
    /// readings in one DST gap) or beyond chrono's calendar.
    fn window_of(&self, date: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let end_date = if self.end > self.start { date } else { date.succ_opt()? };
        let from = self.instant(date.and_time(self.start), Pick::Earliest);
        let to = self.instant(end_date.and_time(self.end), Pick::Latest);
        (from < to).then_some((from, to))
    }

    /// The real instant of a wall-clock reading in the blackout's zone.
    fn instant(&self, local: NaiveDateTime, pick: Pick) -> DateTime<Utc> {
        match self.zone.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(earliest, latest) => match pick {
                Pick::Earliest => earliest.with_timezone(&Utc),
                Pick::Latest => latest.with_timezone(&Utc),
            },
            LocalResult::None => self.end_of_gap(local),
        }
    }

    /// The transition instant that skipped the non-existent reading `local`.
    ///
    /// Walks the wall clock forward a minute at a time to the first reading
    /// that exists, whose instant is less than a minute past the transition
    /// (the reading a minute earlier did not exist), then narrows down to
    /// the exact second at which the zone's offset changes. Zone offsets
    /// and configured times are whole seconds, so the result is exact.
    fn end_of_gap(&self, local: NaiveDateTime) -> DateTime<Utc> {
        let mut probe = local;
        for _ in 0..MAX_GAP_MINUTES {
            let Some(next) = probe.checked_add_signed(TimeDelta::minutes(1)) else { break };
            probe = next;
            let Some(after) = self.zone.from_local_datetime(&probe).earliest() else { continue };
            let after = after.with_timezone(&Utc);
            let new_offset = self.offset_at(after);
            // Invariant: the offset at `lo` is the old one, at `hi` the new.
            let mut lo = after.timestamp() - 60;
            let mut hi = after.timestamp();
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                match DateTime::from_timestamp(mid, 0) {
                    Some(m) if self.offset_at(m) == new_offset => hi = mid,
                    Some(_) => lo = mid,
                    None => break,
                }
            }
            return DateTime::from_timestamp(hi, 0).unwrap_or(after);
        }
        // Unreachable with real zone data: read `local` with the offset in
        // force around it, which is at worst a gap's length off.
        let offset = self.zone.offset_from_utc_datetime(&local).fix();
        local.checked_sub_signed(TimeDelta::seconds(i64::from(offset.local_minus_utc()))).unwrap_or(local).and_utc()
    }

    /// The local date of `t`, `None` past the ends of chrono's calendar
    /// (where `with_timezone` would panic). Callers that saturate to
    /// [`DateTime::<Utc>::MAX_UTC`] for "never" land there.
    fn local_date(&self, t: DateTime<Utc>) -> Option<NaiveDate> {
        let offset = self.offset_at(t).local_minus_utc();
        let local = t.naive_utc().checked_add_signed(TimeDelta::seconds(i64::from(offset)))?;
        Some(local.date())
    }

    fn offset_at(&self, t: DateTime<Utc>) -> chrono::FixedOffset {
        self.zone.offset_from_utc_datetime(&t.naive_utc()).fix()
    }
}

/// Shown in logs and `status` as `01:30–03:00 Europe/Berlin`, the way the
/// operator configured it, so the two can be compared at a glance.
impl fmt::Display for Blackout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}–{} {}", TimeOfDay(self.start), TimeOfDay(self.end), self.zone.name())
    }
}

/// `HH:MM`, or `HH:MM:SS` when the seconds matter.
struct TimeOfDay(NaiveTime);

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(f, "{:02}:{:02}", t.hour(), t.minute())?;
        if t.second() != 0 {
            write!(f, ":{:02}", t.second())?;
        }
        Ok(())
    }
}

/// Parses `HH:MM` or `HH:MM:SS` exactly: two digits per field, 00-23
/// hours, 00-59 minutes and seconds (no leap second, no 24:00, no spaces,
/// no signs).
fn parse_time_of_day(which: &str, s: &str) -> Result<NaiveTime, WindowError> {
    let bad = || {
        WindowError(format!(
            "blackout {which} {:?} is not a time of day (HH:MM or HH:MM:SS, 24-hour clock)",
            shorten(s)
        ))
    };
    let b = s.as_bytes();
    let two = |i: usize| -> Option<u32> {
        let (hi, lo) = (*b.get(i)?, *b.get(i + 1)?);
        (hi.is_ascii_digit() && lo.is_ascii_digit()).then(|| u32::from(hi - b'0') * 10 + u32::from(lo - b'0'))
    };
    let (h, m, sec) = match b.len() {
        5 if b[2] == b':' => (two(0), two(3), Some(0)),
        8 if b[2] == b':' && b[5] == b':' => (two(0), two(3), two(6)),
        _ => return Err(bad()),
    };
    match (h, m, sec) {
        (Some(h), Some(m), Some(sec)) if h < 24 && m < 60 && sec < 60 => {
            NaiveTime::from_hms_opt(h, m, sec).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

/// Keeps error messages readable when someone pastes a paragraph into a
/// time field.
fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut short: String = s.chars().take(MAX).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn berlin() -> Blackout {
        Blackout::parse("01:30", "03:00", "Europe/Berlin").unwrap()
    }

    fn new_york() -> Blackout {
        Blackout::parse("01:30", "03:00", "America/New_York").unwrap()
    }

    fn minutes(w: (DateTime<Utc>, DateTime<Utc>)) -> i64 {
        (w.1 - w.0).num_minutes()
    }

    #[test]
    fn parses_hh_mm_and_hh_mm_ss() {
        let b = Blackout::parse("01:30", "03:00:15", "Europe/Berlin").unwrap();
        assert_eq!(b.start, NaiveTime::from_hms_opt(1, 30, 0).unwrap());
        assert_eq!(b.end, NaiveTime::from_hms_opt(3, 0, 15).unwrap());
        assert_eq!(b.zone, chrono_tz::Europe::Berlin);
        let b = Blackout::parse("00:00", "23:59:59", "UTC").unwrap();
        assert_eq!(b.zone, chrono_tz::UTC);
        assert!(Blackout::parse("23:00", "01:00", "Asia/Kolkata").is_ok());
    }

    #[test]
    fn refuses_garbage_times_naming_the_value() {
        for bad in [
            "",
            "1:30",
            "1:3x",
            "01:3x",
            "24:00",
            "25:00",
            "-01:00",
            "01:60",
            "01:30:60",
            " 01:30",
            "01:30 ",
            "01-30",
            "0130",
            "01:30:",
            "01:30:0",
            "01:30:000",
            "01:30:00.5",
            "+1:30",
            "１2:00",
            "ab:cd",
            "01:30am",
            "1:30 PM",
            "\u{0}",
            "99:99:99",
            ":01:30",
            "01::30",
        ] {
            let err = Blackout::parse(bad, "03:00", "Europe/Berlin").unwrap_err();
            assert_eq!(
                err.0,
                format!("blackout start {bad:?} is not a time of day (HH:MM or HH:MM:SS, 24-hour clock)"),
                "start {bad:?}"
            );
            let err = Blackout::parse("01:30", bad, "Europe/Berlin").unwrap_err();
            assert!(err.0.starts_with(&format!("blackout end {bad:?} is not a time of day")), "end {bad:?}: {err}");
        }
        let err = Blackout::parse("25:00", "03:00", "Europe/Berlin").unwrap_err();
        assert!(err.to_string().starts_with("blackout start \"25:00\" is not a time of day (HH:MM"));
    }

    #[test]
    fn refuses_unknown_zones() {
        for bad in ["Mars/Base", "", "europe/berlin", " Europe/Berlin", "Europe/Berlin ", "CEST", "+01:00", "Berlin"] {
            let err = Blackout::parse("01:30", "03:00", bad).unwrap_err();
            assert!(err.0.starts_with(&format!("unknown time zone {bad:?}")), "{bad:?}: {err}");
        }
        assert_eq!(
            Blackout::parse("01:30", "03:00", "Mars/Base").unwrap_err().to_string(),
            "unknown time zone \"Mars/Base\": use an IANA name such as \"Europe/Berlin\""
        );
    }

    #[test]
    fn refuses_an_empty_window() {
        let err = Blackout::parse("01:30", "01:30", "Europe/Berlin").unwrap_err();
        assert_eq!(err.0, "blackout start and end are both 01:30: the window would be empty");
        let err = Blackout::parse("01:30:00", "01:30", "UTC").unwrap_err();
        assert_eq!(err.0, "blackout start and end are both 01:30: the window would be empty");
        let err = Blackout::parse("01:30:05", "01:30:05", "UTC").unwrap_err();
        assert_eq!(err.0, "blackout start and end are both 01:30:05: the window would be empty");
    }

    #[test]
    fn long_garbage_is_shortened_in_the_message() {
        let long = "x".repeat(500);
        let err = Blackout::parse(&long, "03:00", "UTC").unwrap_err();
        assert!(err.0.len() < 200, "{}", err.0);
        let err = Blackout::parse("01:30", "03:00", &long).unwrap_err();
        assert!(err.0.len() < 200, "{}", err.0);
    }

    #[test]
    fn displays_like_the_configuration() {
        assert_eq!(berlin().to_string(), "01:30–03:00 Europe/Berlin");
        assert_eq!(Blackout::parse("23:00", "01:00:30", "UTC").unwrap().to_string(), "23:00–01:00:30 UTC");
    }

    #[test]
    fn ordinary_night() {
        let b = berlin();
        // 2026-06-10 is summer time (UTC+2): 01:30 CEST = 23:30 UTC the day before.
        let w = b.window_at(utc(2026, 6, 10, 0, 0)).unwrap();
        assert_eq!(w, (utc(2026, 6, 9, 23, 30), utc(2026, 6, 10, 1, 0)));
        // Winter (UTC+1).
        let w = b.window_at(utc(2026, 1, 15, 1, 0)).unwrap();
        assert_eq!(w, (utc(2026, 1, 15, 0, 30), utc(2026, 1, 15, 2, 0)));
        assert_eq!(minutes(w), 90);
        assert_eq!(b.window_at(utc(2026, 1, 15, 12, 0)), None);
    }

    #[test]
    fn berlin_spring_forward_is_thirty_minutes() {
        let b = berlin();
        let w = b.window_at(utc(2026, 3, 29, 0, 45)).unwrap();
        // 01:30 CET to 03:00 CEST.
        assert_eq!(w, (utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0)));
        assert_eq!(minutes(w), 30);
    }

    #[test]
    fn berlin_fall_back_is_two_and_a_half_hours() {
        let b = berlin();
        let w = b.window_at(utc(2026, 10, 25, 1, 0)).unwrap();
        // 01:30 CEST to 03:00 CET.
        assert_eq!(w, (utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 0)));
        assert_eq!(minutes(w), 150);
    }

    #[test]
    fn new_york_spring_forward_is_thirty_minutes() {
        let b = new_york();
        let w = b.window_at(utc(2026, 3, 8, 6, 45)).unwrap();
        // 01:30 EST (UTC-5) to 03:00 EDT (UTC-4).
        assert_eq!(w, (utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 0)));
        assert_eq!(minutes(w), 30);
    }

    #[test]
    fn new_york_fall_back_includes_the_repeated_hour() {
        let b = new_york();
        // 01:30 EDT (UTC-4) to 03:00 EST (UTC-5).
        let expected = (utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 8, 0));
        assert_eq!(b.window_at(utc(2026, 11, 1, 5, 30)), Some(expected));
        assert_eq!(minutes(expected), 150);
        // 01:15 EST, the second 01:15 of the night: before `start` on the
        // wall clock, but inside the one continuous window.
        assert_eq!(b.window_at(utc(2026, 11, 1, 6, 15)), Some(expected));
        // 01:15 EDT, the first 01:15: before the window.
        assert_eq!(b.window_at(utc(2026, 11, 1, 5, 15)), None);
    }

    #[test]
    fn start_in_the_gap_begins_at_the_transition() {
        // Berlin jumps 02:00 CET -> 03:00 CEST at 01:00 UTC.
        let b = Blackout::parse("02:30", "04:00", "Europe/Berlin").unwrap();
        let w = b.window_at(utc(2026, 3, 29, 1, 0)).unwrap();
        assert_eq!(w, (utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 2, 0)));
        assert!(!b.contains(utc(2026, 3, 29, 0, 59)));
        assert_eq!(b.next_start(utc(2026, 3, 28, 12, 0)), utc(2026, 3, 29, 1, 0));
    }

    #[test]
    fn end_in_the_gap_ends_at_the_transition() {
        let b = Blackout::parse("01:00", "02:30", "Europe/Berlin").unwrap();
        let w = b.window_at(utc(2026, 3, 29, 0, 30)).unwrap();
        assert_eq!(w, (utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 1, 0)));
    }

    #[test]
    fn window_inside_the_gap_is_empty_that_night() {
        let b = Blackout::parse("02:00", "02:45", "Europe/Berlin").unwrap();
        for m in 0..24 * 60 {
            let t = utc(2026, 3, 28, 23, 0) + TimeDelta::minutes(m);
            assert!(!b.contains(t), "{t}");
        }
        // The next start skips the empty night.
        assert_eq!(b.next_start(utc(2026, 3, 28, 12, 0)), utc(2026, 3, 30, 0, 0));
        // The nights around it are normal.
        assert_eq!(b.window_at(utc(2026, 3, 28, 1, 10)), Some((utc(2026, 3, 28, 1, 0), utc(2026, 3, 28, 1, 45))));
    }

    #[test]
    fn end_in_the_repeated_hour_takes_its_second_reading() {
        // Berlin, 2026-10-25: 03:00 CEST -> 02:00 CET at 01:00 UTC.
        let b = Blackout::parse("02:00", "02:30", "Europe/Berlin").unwrap();
        let w = b.window_at(utc(2026, 10, 25, 0, 0)).unwrap();
        // 02:00 CEST (first reading) to 02:30 CET (second reading).
        assert_eq!(w, (utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 1, 30)));
        assert_eq!(minutes(w), 90);
    }

    #[test]
    fn a_day_that_never_happened() {
        // Samoa skipped 2011-12-30 entirely (UTC-10 -> UTC+14 at 10:00 UTC).
        let b = Blackout::parse("01:30", "03:00", "Pacific/Apia").unwrap();
        // 2011-12-29 01:30 at UTC-10.
        assert_eq!(b.window_at(utc(2011, 12, 29, 12, 0)), Some((utc(2011, 12, 29, 11, 30), utc(2011, 12, 29, 13, 0))));
        // No window on the missing day; the next one is 2011-12-31 01:30 at UTC+14.
        assert_eq!(b.next_start(utc(2011, 12, 29, 13, 0)), utc(2011, 12, 30, 11, 30));
        assert!(!b.contains(utc(2011, 12, 30, 10, 0)));
    }

    #[test]
    fn window_crossing_midnight() {
        let b = Blackout::parse("23:00", "01:00", "Europe/Berlin").unwrap();
        // 2026-01-15 23:00 CET = 22:00 UTC, to 2026-01-16 01:00 CET = 00:00 UTC.
        let expected = (utc(2026, 1, 15, 22, 0), utc(2026, 1, 16, 0, 0));
        assert_eq!(b.window_at(utc(2026, 1, 15, 22, 0)), Some(expected));
        assert_eq!(b.window_at(utc(2026, 1, 15, 23, 30)), Some(expected));
        assert_eq!(b.window_at(utc(2026, 1, 15, 23, 59)), Some(expected));
        assert_eq!(b.window_at(utc(2026, 1, 16, 0, 0)), None);
        assert_eq!(b.window_at(utc(2026, 1, 15, 21, 59)), None);
        assert_eq!(b.next_open(utc(2026, 1, 15, 23, 0)), utc(2026, 1, 16, 0, 0));
        assert_eq!(b.next_start(utc(2026, 1, 15, 22, 0)), utc(2026, 1, 16, 22, 0));
        assert_eq!(b.next_start(utc(2026, 1, 15, 12, 0)), utc(2026, 1, 15, 22, 0));
    }

    #[test]
    fn window_crossing_midnight_on_dst_nights() {
        let b = Blackout::parse("23:00", "03:00", "Europe/Berlin").unwrap();
        // 2026-03-28 23:00 CET to 2026-03-29 03:00 CEST: 3 real hours.
        let w = b.window_at(utc(2026, 3, 28, 23, 0)).unwrap();
        assert_eq!(w, (utc(2026, 3, 28, 22, 0), utc(2026, 3, 29, 1, 0)));
        // 2026-10-24 23:00 CEST to 2026-10-25 03:00 CET: 5 real hours.
        let w = b.window_at(utc(2026, 10, 25, 0, 0)).unwrap();
        assert_eq!(w, (utc(2026, 10, 24, 21, 0), utc(2026, 10, 25, 2, 0)));
    }

    #[test]
    fn from_is_inside_and_to_is_outside() {
        let b = berlin();
        let (from, to) = (utc(2026, 1, 15, 0, 30), utc(2026, 1, 15, 2, 0));
        let second = TimeDelta::seconds(1);
        let nano = TimeDelta::nanoseconds(1);
        assert!(b.contains(from));
        assert!(!b.contains(from - nano));
        assert!(!b.contains(from - second));
        assert!(b.contains(to - nano));
        assert!(!b.contains(to));
        assert_eq!(b.next_open(from), to);
        assert_eq!(b.next_open(to - nano), to);
        assert_eq!(b.next_open(to), to);
        assert_eq!(b.next_open(from - nano), from - nano);
    }

    #[test]
    fn next_open_and_next_start_across_days() {
        let b = berlin();
        // Noon: outside; the next window starts tonight at 01:30 CET.
        let noon = utc(2026, 1, 15, 11, 0);
        assert_eq!(b.next_open(noon), noon);
        assert_eq!(b.next_start(noon), utc(2026, 1, 16, 0, 30));
        // Just before midnight UTC, still before tonight's window.
        assert_eq!(b.next_start(utc(2026, 1, 15, 23, 59)), utc(2026, 1, 16, 0, 30));
        // Inside a window: next_open is its end, next_start the next night's.
        let inside = utc(2026, 1, 16, 1, 0);
        assert_eq!(b.next_open(inside), utc(2026, 1, 16, 2, 0));
        assert_eq!(b.next_start(inside), utc(2026, 1, 17, 0, 30));
        // Exactly at a start: the next start is strictly later.
        assert_eq!(b.next_start(utc(2026, 1, 16, 0, 30)), utc(2026, 1, 17, 0, 30));
        // Across the spring-forward night and into summer time.
        assert_eq!(b.next_start(utc(2026, 3, 28, 12, 0)), utc(2026, 3, 29, 0, 30));
        assert_eq!(b.next_start(utc(2026, 3, 29, 0, 30)), utc(2026, 3, 29, 23, 30));
        // Across the fall-back night.
        assert_eq!(b.next_start(utc(2026, 10, 24, 12, 0)), utc(2026, 10, 24, 23, 30));
        assert_eq!(b.next_start(utc(2026, 10, 25, 1, 59)), utc(2026, 10, 26, 0, 30));
        assert_eq!(b.next_open(utc(2026, 10, 24, 23, 30)), utc(2026, 10, 25, 2, 0));
        // Across a year boundary.
        assert_eq!(b.next_start(utc(2026, 12, 31, 12, 0)), utc(2027, 1, 1, 0, 30));
    }

    #[test]
    fn utc_zone() {
        let b = Blackout::parse("01:30", "03:00", "UTC").unwrap();
        assert_eq!(b.window_at(utc(2026, 3, 29, 2, 0)), Some((utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 3, 0))));
        assert_eq!(b.next_start(utc(2026, 3, 29, 2, 0)), utc(2026, 3, 30, 1, 30));
        let b = Blackout::parse("22:00", "02:00:30", "UTC").unwrap();
        let w = b.window_at(utc(2026, 5, 2, 1, 0)).unwrap();
        assert_eq!(w.0, utc(2026, 5, 1, 22, 0));
        assert_eq!(w.1, utc(2026, 5, 2, 2, 0) + TimeDelta::seconds(30));
    }

    #[test]
    fn overlapping_nights_are_one_window() {
        // 02:30–02:00 leaves 30 open minutes a night, except on the
        // fall-back night: the window of 10-24 ends at the second 02:00
        // (01:00 UTC), after the window of 10-25 has begun at the first
        // 02:30 (00:30 UTC).
        let b = Blackout::parse("02:30", "02:00", "Europe/Berlin").unwrap();
        let t = utc(2026, 10, 25, 0, 45);
        let (from, to) = b.window_at(t).unwrap();
        assert_eq!(from, utc(2026, 10, 24, 0, 30));
        // 2026-10-26 02:00 CET.
        assert_eq!(to, utc(2026, 10, 26, 1, 0));
        assert!(!b.contains(b.next_open(t)));
        assert_eq!(b.window_at(utc(2026, 10, 24, 0, 29)), None);
        assert_eq!(b.window_at(utc(2026, 10, 24, 0, 30)), Some((from, to)));
        // An ordinary night has its 30-minute opening.
        assert_eq!(b.window_at(utc(2026, 1, 15, 1, 15)), None);
    }

    #[test]
    fn extremes_of_the_calendar_do_not_panic() {
        let b = Blackout::parse("23:00", "01:00", "Europe/Berlin").unwrap();
        for t in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            let _ = b.window_at(t);
            let _ = b.next_open(t);
            let _ = b.next_start(t);
        }
    }

    /// Every minute of 2026 in Berlin: the helpers agree with each other
    /// and with the wall clock (for 01:30–03:00 in Berlin, "inside" is
    /// exactly "the wall clock reads 01:30 to 02:59", even on DST nights).
    #[test]
    fn every_minute_of_2026_in_berlin() {
        let b = berlin();
        // One thread per local month (each starts at local midnight, outside
        // any window), to keep the half a million minutes quick in debug.
        let month_start = |y: i32, m: u32| b.zone.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap().to_utc();
        let totals: Vec<(u32, u32)> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=12)
                .map(|m| {
                    let (from, to) =
                        (month_start(2026, m), if m == 12 { month_start(2027, 1) } else { month_start(2026, m + 1) });
                    s.spawn(move || check_minutes(&b, from, to))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let windows: u32 = totals.iter().map(|t| t.0).sum();
        let inside_minutes: u32 = totals.iter().map(|t| t.1).sum();
        assert_eq!(windows, 365);
        // 90 minutes a night, 60 lost in spring, 60 gained in autumn.
        assert_eq!(inside_minutes, 365 * 90 - 60 + 60);
        // Spot checks of the monthly split.
        assert_eq!(totals[2], (31, 31 * 90 - 60));
        assert_eq!(totals[9], (31, 31 * 90 + 60));
    }

    /// Checks every minute in `[start, end)`; returns the number of windows
    /// entered and of minutes inside one.
    fn check_minutes(b: &Blackout, start: DateTime<Utc>, end: DateTime<Utc>) -> (u32, u32) {
        let lo = NaiveTime::from_hms_opt(1, 30, 0).unwrap();
        let hi = NaiveTime::from_hms_opt(3, 0, 0).unwrap();
        let mut t = start;
        let mut inside_minutes = 0;
        let mut windows = 0;
        let mut pending_start: Option<DateTime<Utc>> = None;
        let mut was_inside = false;
        while t < end {
            let w = b.window_at(t);
            let inside = b.contains(t);
            assert_eq!(inside, w.is_some_and(|(f, e)| f <= t && t < e), "{t}");
            let wall = t.with_timezone(&b.zone).time();
            assert_eq!(inside, lo <= wall && wall < hi, "{t} reads {wall}");

            let open = b.next_open(t);
            if inside {
                assert!(open > t && !b.contains(open), "{t}: next_open {open}");
            } else {
                assert_eq!(open, t);
            }
            let next = b.next_start(t);
            assert!(next > t, "{t}: next_start {next}");
            if Some(next) != pending_start {
                // A new announced start: it must begin a window.
                assert_eq!(b.window_at(next).map(|w| w.0), Some(next), "{t}: next_start {next}");
            }

            if inside {
                inside_minutes += 1;
                if !was_inside {
                    // The window just entered is the one next_start
                    // announced a minute ago.
                    windows += 1;
                    assert_eq!(Some(t), pending_start, "{t}");
                    assert_eq!(w.unwrap().0, t);
                }
            }
            was_inside = inside;
            pending_start = Some(next);
            t += TimeDelta::minutes(1);
        }
        (windows, inside_minutes)
    }
}
