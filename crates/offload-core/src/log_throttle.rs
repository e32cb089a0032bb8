//! How often a failure that repeats with every request reaches the log.
//!
//! A full disk or an unreachable database fails every request alike, and a
//! node that wrote a line for each (two, with the store's own) wrote 4,000 a
//! second under a sequential client, to a log that may well be on the disk
//! that is full. The core writes no line itself; it only decides, so that
//! the stores' writers and the server's error answers follow one rule.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind written in each second; the rest are counted.
pub const LOG_LINES_PER_SECOND: u32 = 5;

/// Decides whether a log line that may repeat once per request is written:
/// the first [`LOG_LINES_PER_SECOND`] of each second are, the others are
/// left out and counted, and the next line written says how many it stands
/// for. Kept in a `static` beside the line it throttles.
#[derive(Debug)]
pub struct LogThrottle {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    written: u32,
    left_out: u64,
}

impl LogThrottle {
    pub const fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                started: None,
                written: 0,
                left_out: 0,
            }),
        }
    }

    /// `Some(n)`: write the line, and say that `n` like it were left out
    /// since the last one written; `None`: leave it out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let over = window
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= Duration::from_secs(1));
        if over {
            window.started = Some(now);
            window.written = 0;
        }
        if window.written < LOG_LINES_PER_SECOND {
            window.written += 1;
            Some(std::mem::take(&mut window.left_out))
        } else {
            window.left_out += 1;
            None
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_writes_a_few_lines_and_the_next_one_counts_the_rest() {
        let throttle = LogThrottle::new();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let burst: Vec<_> = (0..12).map(|i| throttle.admit_at(at(i))).collect();
        let written = burst.iter().filter(|a| a.is_some()).count();
        assert_eq!(written, LOG_LINES_PER_SECOND as usize);
        assert!(burst.iter().flatten().all(|&left_out| left_out == 0));
        assert_eq!(throttle.admit_at(at(999)), None, "still the same second");
        assert_eq!(
            throttle.admit_at(at(1000)),
            Some(12 - u64::from(LOG_LINES_PER_SECOND) + 1),
            "the first line of the next second counts every one left out"
        );
        assert_eq!(throttle.admit_at(at(1001)), Some(0));
    }

    #[test]
    fn every_failure_is_written_or_counted_by_a_line_written_later() {
        let throttle = LogThrottle::new();
        let start = Instant::now();
        let mut accounted = 0;
        let failures = 10_000;
        // A failure every 0.3 ms for three seconds, then one more later.
        for i in 0..failures {
            if let Some(left_out) = throttle.admit_at(start + Duration::from_micros(i * 300)) {
                accounted += 1 + left_out;
            }
        }
        let last = throttle
            .admit_at(start + Duration::from_secs(60))
            .expect("a line a minute on is written");
        accounted += 1 + last;
        assert_eq!(accounted, failures + 1);
    }
}
