//! A plain-text progress bar on stderr for long runs.
//!
//! Progress goes to stderr only, so stdout and the output files stay
//! byte-identical between runs. On a terminal the bar redraws in place;
//! otherwise one line is printed every 10 % or every 30 s of wall time.
//! The wall clock is read here and in `main` only, never by the simulation.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const WIDTH: usize = 30;
/// Longest silence between two lines when stderr is not a terminal.
const QUIET_FOR: Duration = Duration::from_secs(30);

/// Progress of one simulated phase, in virtual time.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    label: String,
    start: Duration,
    end: Duration,
    next: Duration,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A bar that draws nothing.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            tty: false,
            label: String::new(),
            start: Duration::ZERO,
            end: Duration::ZERO,
            next: Duration::MAX,
            started: now(),
            last_line: now(),
        }
    }

    /// A bar on stderr.
    pub fn stderr() -> Self {
        Self {
            enabled: true,
            tty: std::io::stderr().is_terminal(),
            ..Self::disabled()
        }
    }

    /// Starts a phase from virtual time `start` to `end`.
    pub fn phase(&mut self, label: &str, start: Duration, end: Duration) {
        if !self.enabled {
            return;
        }
        self.label = label.to_owned();
        self.start = start;
        self.end = end;
        self.next = start;
        self.started = now();
        self.last_line = self.started;
    }

    /// Whether [`Progress::update`] would draw at virtual time `at`.
    pub fn due(&self, at: Duration) -> bool {
        self.enabled && (at >= self.next || self.last_line.elapsed() >= QUIET_FOR)
    }

    /// Draws the bar for virtual time `now` with `live` running nodes.
    pub fn update(&mut self, now: Duration, live: usize) {
        if !self.due(now) {
            return;
        }
        self.last_line = self::now();
        let span = self.end.saturating_sub(self.start);
        let done = now.saturating_sub(self.start).min(span);
        let frac = if span.is_zero() {
            1.0
        } else {
            done.as_secs_f64() / span.as_secs_f64()
        };
        let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
        let line = format!(
            "{:<10} [{}{}] {:>3.0}%  t={:.1}s  live={}  wall={:.1}s",
            self.label,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            frac * 100.0,
            now.as_secs_f64(),
            live,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}");
            let _ = err.flush();
            self.next = now + span / 200;
        } else {
            let _ = writeln!(err, "{line}");
            self.next = now + span / 10;
        }
        if span.is_zero() {
            self.next = Duration::MAX;
        }
    }

    /// Ends the phase's bar.
    pub fn finish(&mut self, now: Duration, live: usize) {
        if !self.enabled {
            return;
        }
        self.next = now;
        self.update(now, live);
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
        self.next = Duration::MAX;
    }
}

/// The wall clock, for reporting progress only.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}
