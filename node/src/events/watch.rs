//! Watch handlers: a command run once per event, with the event as JSON
//! on its stdin and a few variables in its environment:
//!
//! | variable | value |
//! |---|---|
//! | `GOSSAMER_EVENT_ID` | the event's id |
//! | `GOSSAMER_EVENT_TYPE` | `member`, `service`, `health`, `config`, `outlier` or `gap` |
//! | `GOSSAMER_EVENT_ACTION` | `up`, `down`, `registered`, `changed`, `applied`, ... |
//! | `GOSSAMER_EVENT_NODE`, `_SERVICE`, `_INSTANCE` | when the event has them |
//! | `GOSSAMER_EVENT_COALESCED` | how many events this run stands for (1 unless a burst was folded) |
//!
//! Events that arrive within `coalesce` of each other are gathered (for
//! at most ten times that), and of the events about the same thing (the
//! same member, instance or document) only the last is handled. A handler
//! that runs past `timeout` is killed; failures and timeouts are reported,
//! and the next event is handled all the same.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Event, Filter, Kind};

/// Default handler timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Default quiet time that ends a burst.
pub const COALESCE: Duration = Duration::from_millis(500);

/// `[[watch]]` in the agent config: a handler for the agent's lifetime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Event types (`member`, `service`, `health`, `config`, `outlier`);
    /// all when empty.
    #[serde(default)]
    pub types: Vec<String>,
    /// Only events about this service.
    #[serde(default)]
    pub service: Option<String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// How long one run may take before it is killed.
    #[serde(default = "default_timeout", with = "gossamer_membership::duration")]
    pub timeout: Duration,
    /// Quiet time that ends a burst.
    #[serde(default = "default_coalesce", with = "gossamer_membership::duration")]
    pub coalesce: Duration,
}

fn default_timeout() -> Duration {
    TIMEOUT
}

fn default_coalesce() -> Duration {
    COALESCE
}

impl WatchConfig {
    /// Checks the fields and builds the handler.
    pub fn handler(&self, index: usize) -> Result<Handler, String> {
        let at = |field: &str| format!("watch[{index}].{field}");
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(format!(
                "{}: a program to run, as [\"/path/to/script\", \"arg\"]",
                at("command")
            ));
        }
        let kinds = self
            .types
            .iter()
            .map(|t| Kind::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", at("types")))?;
        if self.timeout.is_zero() {
            return Err(format!("{}: longer than 0", at("timeout")));
        }
        if self.coalesce > Duration::from_secs(60) {
            return Err(format!("{}: at most 60s", at("coalesce")));
        }
        Ok(Handler {
            name: format!("watch[{index}] {}", self.command[0]),
            filter: Filter {
                kinds,
                service: self.service.clone(),
            },
            command: self.command.clone(),
            timeout: self.timeout,
            coalesce: self.coalesce,
            inherit_output: false,
        })
    }
}

/// A command to run per event.
#[derive(Debug, Clone)]
pub struct Handler {
    /// For reports.
    pub name: String,
    /// Which events.
    pub filter: Filter,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Longest run.
    pub timeout: Duration,
    /// Quiet time that ends a burst.
    pub coalesce: Duration,
    /// Whether the command writes to our stdout and stderr (the CLI) or
    /// has its output discarded (the agent).
    pub inherit_output: bool,
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// Another exit status, or killed by a signal.
    Failed(String),
    /// Ran past the timeout and was killed.
    TimedOut,
    /// Could not be started.
    NotStarted(String),
}

/// Folds a burst: of the events about the same thing, only the last is
/// kept (at the place of the first), with how many it stands for.
pub fn coalesce(batch: Vec<Arc<Event>>) -> Vec<(Arc<Event>, usize)> {
    let mut out: Vec<(Arc<Event>, usize)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for event in batch {
        let key = format!("{:?}", event.subject());
        match at.get(&key) {
            Some(&i) => {
                out[i].0 = event;
                out[i].1 += 1;
            }
            None => {
                at.insert(key, out.len());
                out.push((event, 1));
            }
        }
    }
    out
}

impl Handler {
    /// Runs the handler for every event `rx` yields, until it closes;
    /// `report` hears how each run ended.
    pub async fn run(
        &self,
        mut rx: mpsc::Receiver<Arc<Event>>,
        mut report: impl FnMut(&Event, usize, &Outcome),
    ) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let hard = tokio::time::Instant::now() + self.coalesce * 10;
            loop {
                let wait = (tokio::time::Instant::now() + self.coalesce).min(hard);
                match tokio::time::timeout_at(wait, rx.recv()).await {
                    Ok(Some(event)) => batch.push(event),
                    Ok(None) | Err(_) => break,
                }
            }
            for (event, folded) in coalesce(batch) {
                let outcome = self.once(&event, folded).await;
                report(&event, folded, &outcome);
            }
        }
    }

    /// Runs the command for one event.
    pub async fn once(&self, event: &Event, folded: usize) -> Outcome {
        let mut command = tokio::process::Command::new(&self.command[0]);
        command
            .args(&self.command[1..])
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .env("GOSSAMER_EVENT_ID", event.id.to_string())
            .env("GOSSAMER_EVENT_TYPE", event.kind.as_str())
            .env("GOSSAMER_EVENT_ACTION", &event.action)
            .env("GOSSAMER_EVENT_COALESCED", folded.to_string());
        for (name, value) in [
            ("GOSSAMER_EVENT_NODE", &event.node),
            ("GOSSAMER_EVENT_SERVICE", &event.service),
            ("GOSSAMER_EVENT_INSTANCE", &event.instance),
        ] {
            match value {
                Some(v) => command.env(name, v),
                None => command.env_remove(name),
            };
        }
        if !self.inherit_output {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => return Outcome::NotStarted(format!("{}: {e}", self.command[0])),
        };
        let mut json = serde_json::to_vec(event).expect("events serialize");
        json.push(b'\n');
        let run = async {
            if let Some(mut stdin) = child.stdin.take() {
                // A handler that ignores its stdin is fine.
                let _ = stdin.write_all(&json).await;
            }
            child.wait().await
        };
        let ended = tokio::time::timeout(self.timeout, run).await;
        match ended {
            Ok(Ok(status)) if status.success() => Outcome::Ok,
            Ok(Ok(status)) => Outcome::Failed(status.to_string()),
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Outcome::TimedOut
            }
        }
    }
}

/// Logs how a run of an agent's handler ended.
pub fn log_outcome(handler: &Handler, event: &Event, folded: usize, outcome: &Outcome) {
    let what = format!("{} {}", event.kind.as_str(), event.action);
    match outcome {
        Outcome::Ok => {
            info!(handler = %handler.name, event = event.id, %what, folded, "watch handler ran")
        }
        Outcome::Failed(why) => {
            warn!(handler = %handler.name, event = event.id, %what, error = %why, "watch handler failed");
        }
        Outcome::TimedOut => warn!(
            handler = %handler.name, event = event.id, %what, timeout = ?handler.timeout,
            "watch handler ran past its timeout and was killed"
        ),
        Outcome::NotStarted(why) => {
            warn!(handler = %handler.name, event = event.id, error = %why, "watch handler could not start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(instance: &str, to: &str) -> Arc<Event> {
        let mut e = Event::new(Kind::Health, "changed");
        e.service = Some("web".into());
        e.instance = Some(instance.into());
        e.to = Some(to.into());
        Arc::new(e)
    }

    #[test]
    fn a_burst_keeps_the_last_event_per_subject() {
        let out = coalesce(vec![
            health("a", "critical"),
            health("b", "critical"),
            health("a", "passing"),
            health("a", "critical"),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.instance.as_deref(), Some("a"));
        assert_eq!(out[0].0.to.as_deref(), Some("critical"));
        assert_eq!(out[0].1, 3);
        assert_eq!(out[1].1, 1);
    }

    #[test]
    fn configs_are_checked() {
        let ok = WatchConfig {
            types: vec!["member".into()],
            service: None,
            command: vec!["/bin/true".into()],
            timeout: TIMEOUT,
            coalesce: COALESCE,
        };
        assert!(ok.handler(0).is_ok());
        let mut bad = ok.clone();
        bad.types = vec!["members".into()];
        assert!(bad.handler(0).unwrap_err().contains("watch[0].types"));
        let mut bad = ok;
        bad.command.clear();
        assert!(bad.handler(1).unwrap_err().contains("watch[1].command"));
    }
}
