//! The resync rate controller, after DRBD's dynamic one (c-plan-ahead,
//! c-fill-target, c-max-rate, c-min-rate), in a simpler form.
//!
//! - The amount in flight (sent, not yet acknowledged) is kept at most at
//!   the fill target: that is what keeps the link and the peer's disk
//!   busy without queueing seconds of data ahead of application writes.
//! - The rate is at most `max_rate` (0: no limit), enforced by a token
//!   bucket whose depth is `plan_ahead` worth of that rate.
//! - While the application writes (a request in the last `plan_ahead`,
//!   at most 100 ms), the resync yields: it runs at `min_rate` with one
//!   chunk in flight, so its frames do not queue ahead of the
//!   application's on the link and the peer's disk. It never goes below
//!   `min_rate`, so a busy application cannot stall the sync.
//!
//! Pure: the caller passes the time, so the tests need no clock.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

/// The knobs, as configured (`[resync]`) and changed at run time
/// (`replctl resync-rate`). Rates in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSettings {
    pub plan_ahead_ms: u64,
    /// Bytes in flight at most.
    pub fill_target: u64,
    /// 0: unlimited.
    pub max_rate: u64,
    pub min_rate: u64,
}

impl Default for RateSettings {
    fn default() -> Self {
        RateSettings {
            plan_ahead_ms: 200,
            fill_target: 16 * MIB,
            max_rate: 0,
            min_rate: 16 * MIB,
        }
    }
}

impl RateSettings {
    /// A clear message if the values make no sense together.
    pub fn check(&self) -> Result<(), String> {
        if self.plan_ahead_ms == 0 || self.plan_ahead_ms > 60_000 {
            return Err(format!(
                "c_plan_ahead_ms = {} must be between 1 and 60000",
                self.plan_ahead_ms
            ));
        }
        if self.fill_target < 64 * 1024 || self.fill_target > 1 << 30 {
            return Err(format!(
                "c_fill_target_kib = {} must be between 64 and 1048576",
                self.fill_target / 1024
            ));
        }
        if self.min_rate == 0 {
            return Err("c_min_rate_mib must be at least 1 (a sync must progress)".into());
        }
        if self.max_rate != 0 && self.max_rate < self.min_rate {
            return Err(format!(
                "c_max_rate_mib = {} is below c_min_rate_mib = {}",
                self.max_rate / MIB,
                self.min_rate / MIB
            ));
        }
        Ok(())
    }
}

/// What the controller allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Send a chunk of at most this many bytes.
    Send(u64),
    /// Wait (at most this long) for tokens or acknowledgements.
    Wait(Duration),
}

/// The controller's state for one sync.
#[derive(Debug, Clone)]
pub struct Controller {
    tokens: f64,
    last: Instant,
    /// The application's request count when last looked at, and when it
    /// last changed.
    app_seen: u64,
    app_active_at: Option<Instant>,
}

impl Controller {
    /// A controller for a sync starting at `now`, with the application's
    /// request counter at `app`: requests counted before the sync (say,
    /// the writes that made it necessary) do not make it yield.
    pub fn new(now: Instant, app: u64) -> Controller {
        Controller {
            tokens: 0.0,
            last: now,
            app_seen: app,
            app_active_at: None,
        }
    }

    /// Whether the application wrote recently (`app` counts its requests).
    pub fn app_active(&mut self, s: &RateSettings, app: u64, now: Instant) -> bool {
        if app != self.app_seen {
            self.app_seen = app;
            self.app_active_at = Some(now);
        }
        let quiet = Duration::from_millis(s.plan_ahead_ms.min(100));
        self.app_active_at
            .is_some_and(|t| now.duration_since(t) < quiet)
    }

    /// May a chunk of up to `chunk` bytes go now, with `in_flight` bytes
    /// unacknowledged and the application's request counter at `app`?
    pub fn allow(
        &mut self,
        s: &RateSettings,
        chunk: u64,
        in_flight: u64,
        app: u64,
        now: Instant,
    ) -> Allow {
        let yielding = self.app_active(s, app, now);
        let rate = if yielding { s.min_rate } else { s.max_rate };
        let window = if yielding { 1 } else { s.fill_target };
        if in_flight > 0 && in_flight >= window {
            return Allow::Wait(Duration::from_millis(5));
        }
        let room = if yielding {
            chunk.min(256 * 1024)
        } else {
            chunk.min(s.fill_target.saturating_sub(in_flight)).max(4096)
        };
        if rate == 0 {
            self.last = now;
            self.tokens = 0.0;
            return Allow::Send(room);
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let depth = (rate as f64 * s.plan_ahead_ms as f64 / 1000.0).max(room as f64);
        self.tokens = (self.tokens + rate as f64 * dt).min(depth);
        if self.tokens >= room as f64 {
            Allow::Send(room)
        } else {
            let need = (room as f64 - self.tokens) / rate as f64;
            Allow::Wait(Duration::from_secs_f64(need.clamp(0.0005, 0.05)))
        }
    }

    /// `bytes` were sent (or skipped as already equal).
    pub fn spent(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simulate(s: &RateSettings, app_writes: bool, secs: f64) -> f64 {
        let t0 = Instant::now();
        let mut c = Controller::new(t0, 0);
        let mut now = t0;
        let mut sent = 0u64;
        let mut app = 0;
        let end = t0 + Duration::from_secs_f64(secs);
        while now < end {
            if app_writes {
                app += 1;
            }
            // Acknowledgements are instant here: only the rate limits.
            match c.allow(s, 1 << 20, 0, app, now) {
                Allow::Send(n) => {
                    c.spent(n);
                    sent += n;
                }
                Allow::Wait(d) => now += d,
            }
            now += Duration::from_micros(100);
        }
        sent as f64 / secs
    }

    #[test]
    fn max_rate_caps_and_min_rate_holds_under_application_writes() {
        let s = RateSettings {
            max_rate: 100 * MIB,
            min_rate: 10 * MIB,
            ..RateSettings::default()
        };
        let idle = simulate(&s, false, 5.0);
        assert!(
            idle > 90.0 * MIB as f64 && idle < 110.0 * MIB as f64,
            "{idle}"
        );
        let busy = simulate(&s, true, 5.0);
        assert!(
            busy > 9.0 * MIB as f64 && busy < 11.5 * MIB as f64,
            "{busy}"
        );
    }

    #[test]
    fn the_fill_target_bounds_what_is_in_flight() {
        let s = RateSettings::default();
        let mut c = Controller::new(Instant::now(), 0);
        let now = Instant::now();
        assert_eq!(
            c.allow(&s, 1 << 20, s.fill_target - 4096, 0, now),
            Allow::Send(4096)
        );
        assert!(matches!(
            c.allow(&s, 1 << 20, s.fill_target, 0, now),
            Allow::Wait(_)
        ));
        // Yielding: one chunk in flight at most.
        assert!(matches!(c.allow(&s, 1 << 20, 4096, 1, now), Allow::Wait(_)));
    }

    #[test]
    fn requests_before_the_sync_do_not_make_it_yield() {
        let s = RateSettings::default();
        let t0 = Instant::now();
        // 16384 application writes while disconnected made this sync.
        let mut c = Controller::new(t0, 16384);
        assert_eq!(c.allow(&s, 1 << 20, 0, 16384, t0), Allow::Send(1 << 20));
        assert!(!c.app_active(&s, 16384, t0));
        // A write during the sync does.
        assert!(c.app_active(&s, 16385, t0));
    }

    #[test]
    fn nonsense_settings_are_refused() {
        let ok = RateSettings::default();
        assert!(ok.check().is_ok());
        let bad = RateSettings {
            max_rate: MIB,
            min_rate: 2 * MIB,
            ..ok
        };
        assert!(bad.check().unwrap_err().contains("below"));
        assert!(RateSettings { min_rate: 0, ..ok }.check().is_err());
        assert!(RateSettings {
            fill_target: 1,
            ..ok
        }
        .check()
        .is_err());
    }
}
