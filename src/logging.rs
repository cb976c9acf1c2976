//! The process logger: UTC timestamps, level and module on every line, to standard error.
//!
//! The level comes from `p2p.loglevel` unless `$KAIROS_P2P_LOG` overrides it. Secrets never reach
//! the log because the types that hold them (token, keys) print themselves redacted.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogLevel;

/// Environment variable that overrides the configured level (`trace`, `debug`, `info`, `warn`,
/// `error`, `fatal`).
pub const LOG_ENV: &str = "KAIROS_P2P_LOG";

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "{} {:<5} {}: {}\n",
            utc_timestamp(SystemTime::now()),
            record.level(),
            record.module_path().unwrap_or_else(|| record.target()),
            record.args()
        );
        // One write per line so lines from the worker thread and the loop do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// The level in force: a valid `$KAIROS_P2P_LOG` (same names as `p2p.loglevel`) wins over the
/// configured one.
pub fn effective_level(configured: LevelFilter, env_value: Option<&str>) -> LevelFilter {
    env_value
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<LogLevel>().ok())
        .map_or(configured, LogLevel::level_filter)
}

/// Installs the logger once for the process; later calls only change the level.
pub fn init(level: LevelFilter) {
    if log::set_boxed_logger(Box::new(StderrLogger {
        level: LevelFilter::Trace,
    }))
    .is_ok()
    {
        log::debug!("logger installed");
    }
    log::set_max_level(level);
}

/// Formats a time as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T06:37:59.123Z`.
pub fn utc_timestamp(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_250, "2000-02-29T00:00:00.250Z"),
            (1_795_675_079_123, "2026-11-26T06:37:59.123Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        ];
        for (millis, expected) in cases {
            assert_eq!(
                utc_timestamp(UNIX_EPOCH + Duration::from_millis(millis)),
                expected
            );
        }
    }

    #[test]
    fn env_level_overrides_the_configured_one() {
        let cases = [
            (Some("debug"), LevelFilter::Debug),
            (Some("FATAL"), LevelFilter::Error),
            (Some(" warning "), LevelFilter::Warn),
            (Some("bogus"), LevelFilter::Info),
            (Some(""), LevelFilter::Info),
            (None, LevelFilter::Info),
        ];
        for (env, expected) in cases {
            assert_eq!(effective_level(LevelFilter::Info, env), expected, "{env:?}");
        }
    }
}
