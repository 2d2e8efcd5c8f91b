//! What happens to the mesh, as this agent sees it, as a stream of events:
//! members coming and going, services registered and deregistered, health
//! changing, configuration documents applied or refused, instances ejected
//! and restored.
//!
//! Events are kept in a ring of [`KEEP`] with increasing ids. A reader
//! passes the last id it saw (`after`, or SSE's `Last-Event-ID`) and gets
//! what came after it that is still kept, then new ones as they happen;
//! if some it asked for are gone, a `gap` event says so first. Ids start
//! from the agent's start time in microseconds, so they keep increasing
//! across restarts and a cursor from before a restart stays meaningful.
//!
//! [`watch`] runs commands for events: `gossamer watch` and the agent's
//! `[[watch]]` handlers.

pub mod source;
pub mod watch;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch as tokio_watch};

/// Events kept for readers that reconnect.
pub const KEEP: usize = 4096;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A member's state: `up`, `suspect`, `down`, `left`, `renewed`, `revoked`.
    Member,
    /// An instance `registered` or `deregistered`.
    Service,
    /// An instance's health `changed`.
    Health,
    /// A document `applied`, `deleted` or `refused`.
    Config,
    /// An instance `ejected` or `restored` by this agent's outlier detection.
    Outlier,
    /// Events a reader asked for are no longer kept (`missed`).
    Gap,
}

impl Kind {
    /// Parses a name as the API and CLI take it.
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "member" => Self::Member,
            "service" => Self::Service,
            "health" => Self::Health,
            "config" => Self::Config,
            "outlier" => Self::Outlier,
            other => {
                return Err(format!(
                    "{other:?} is not an event type (member, service, health, config, outlier)"
                ));
            }
        })
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Service => "service",
            Self::Health => "health",
            Self::Config => "config",
            Self::Outlier => "outlier",
            Self::Gap => "gap",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing; the cursor to resume after.
    pub id: u64,
    /// When this agent saw it, RFC 3339 UTC.
    pub time: String,
    /// What it is about.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// What happened (see [`Kind`]).
    pub action: String,
    /// The member, or the node of the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The instance id (for outliers: `node/id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The state or health before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The state or health after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A document's kind and name (`route/web`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// A document's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Why (a refusal's error, an ejection's length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    /// A new event (its id and time are set when published).
    pub fn new(kind: Kind, action: &str) -> Self {
        Self {
            id: 0,
            time: String::new(),
            kind,
            action: action.to_owned(),
            node: None,
            service: None,
            instance: None,
            from: None,
            to: None,
            document: None,
            version: None,
            reason: None,
        }
    }

    /// What the event is about, for coalescing: later events about the
    /// same thing replace earlier ones.
    pub fn subject(&self) -> (Kind, Option<&str>, Option<&str>, Option<&str>, Option<&str>) {
        (
            self.kind,
            self.node.as_deref(),
            self.service.as_deref(),
            self.instance.as_deref(),
            self.document.as_deref(),
        )
    }
}

struct Ring {
    events: VecDeque<Arc<Event>>,
    next: u64,
}

/// The agent's events: a ring and a signal for readers.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    latest: tokio_watch::Sender<u64>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("kept", &self.events.len())
            .field("next", &self.next)
            .finish()
    }
}

impl Default for Events {
    fn default() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(256),
                next: start,
            }),
            latest: tokio_watch::Sender::new(start - 1),
        }
    }
}

impl Events {
    /// Publishes one event.
    pub fn publish(&self, mut event: Event) {
        let id = {
            let mut ring = self.ring.lock().expect("events lock");
            event.id = ring.next;
            event.time = crate::observe::access::rfc3339(SystemTime::now());
            ring.next += 1;
            if ring.events.len() == KEEP {
                ring.events.pop_front();
            }
            ring.events.push_back(Arc::new(event));
            ring.next - 1
        };
        self.latest.send_replace(id);
    }

    /// The id of the newest event (or one less than the first to come).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Kept events after `after`, and whether some after it are gone.
    pub fn since(&self, after: u64) -> (Vec<Arc<Event>>, Option<u64>) {
        let ring = self.ring.lock().expect("events lock");
        let oldest = ring.events.front().map_or(ring.next, |e| e.id);
        let missed = (after != 0 && after + 1 < oldest).then(|| oldest - after - 1);
        let start = ring.events.partition_point(|e| e.id <= after);
        (ring.events.range(start..).cloned().collect(), missed)
    }

    /// A receiver woken whenever an event is published.
    pub fn subscribe(&self) -> tokio_watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// These types only (all when empty).
    pub kinds: Vec<Kind>,
    /// This service only (events about a service).
    pub service: Option<String>,
}

impl Filter {
    /// Whether `event` passes.
    pub fn admits(&self, event: &Event) -> bool {
        if event.kind == Kind::Gap {
            return true;
        }
        (self.kinds.is_empty() || self.kinds.contains(&event.kind))
            && self
                .service
                .as_ref()
                .is_none_or(|s| event.service.as_deref() == Some(s.as_str()))
    }
}

/// How a stream is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Ndjson,
    /// Server-sent events: `id:` and `data:` lines, for `EventSource`.
    Sse,
}

fn encode(event: &Event, format: Format) -> Bytes {
    let json = serde_json::to_string(event).expect("events serialize");
    match format {
        Format::Ndjson => Bytes::from(format!("{json}\n")),
        Format::Sse => Bytes::from(format!(
            "id: {}\nevent: {}\ndata: {json}\n\n",
            event.id,
            event.kind.as_str()
        )),
    }
}

/// Follows the events after `after` (none when `None`: only events from
/// now on) that pass `filter`, then new ones, until the receiver is
/// dropped. A `gap` event comes first when some asked for are gone; an
/// `Err(())` tick every 15 s of quiet lets a stream send a keep-alive.
pub fn follow(
    events: Arc<Events>,
    after: Option<u64>,
    filter: Filter,
) -> mpsc::Receiver<Option<Arc<Event>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut woken = events.subscribe();
        let mut cursor = after.unwrap_or_else(|| events.latest());
        let mut quiet = tokio::time::interval(std::time::Duration::from_secs(15));
        quiet.tick().await;
        loop {
            let (batch, missed) = events.since(cursor);
            if let Some(n) = missed {
                let mut gap = Event::new(Kind::Gap, "missed");
                gap.id = cursor;
                gap.time = crate::observe::access::rfc3339(SystemTime::now());
                gap.reason = Some(format!(
                    "events {} to {} are no longer kept: the agent keeps the last {KEEP}, and starts higher after a restart",
                    cursor + 1,
                    cursor + n
                ));
                if tx.send(Some(Arc::new(gap))).await.is_err() {
                    return;
                }
            }
            for event in batch {
                cursor = event.id;
                if filter.admits(&event) && tx.send(Some(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = woken.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
                _ = quiet.tick() => if tx.send(None).await.is_err() { return },
            }
        }
    });
    rx
}

/// Streams events (see [`follow`]) to one HTTP reader until it goes away.
pub fn stream(
    events: Arc<Events>,
    after: Option<u64>,
    filter: Filter,
    format: Format,
) -> crate::observe::tap::Stream {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut followed = follow(events, after, filter);
    tokio::spawn(async move {
        if format == Format::Sse {
            // Tell EventSource how soon to reconnect.
            if tx
                .send(Bytes::from_static(b"retry: 1000\n\n"))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                next = followed.recv() => next,
                () = tx.closed() => return,
            };
            let Some(next) = next else { return };
            let chunk = match (next, format) {
                (Some(event), _) => encode(&event, format),
                // A comment line keeps proxies and idle timers from
                // closing a quiet stream.
                (None, Format::Sse) => Bytes::from_static(b": keepalive\n\n"),
                (None, Format::Ndjson) => Bytes::from_static(b"\n"),
            };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    crate::observe::tap::Stream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(action: &str, node: &str) -> Event {
        let mut e = Event::new(Kind::Member, action);
        e.node = Some(node.into());
        e
    }

    #[test]
    fn readers_resume_after_their_cursor() {
        let events = Events::default();
        let before = events.latest();
        events.publish(member("up", "a"));
        events.publish(member("down", "b"));
        let (all, missed) = events.since(before);
        assert_eq!(missed, None);
        assert_eq!(all.len(), 2);
        assert!(all[0].id < all[1].id);
        let (rest, _) = events.since(all[0].id);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].action, "down");
        assert!(events.since(all[1].id).0.is_empty());
    }

    #[test]
    fn a_reader_too_far_behind_is_told() {
        let events = Events::default();
        let first = events.latest() + 1;
        for i in 0..KEEP + 10 {
            events.publish(member("up", &format!("n{i}")));
        }
        let (kept, missed) = events.since(first);
        assert_eq!(missed, Some(9));
        assert_eq!(kept.len(), KEEP);
    }

    #[test]
    fn filters_pick_types_and_services() {
        let f = Filter {
            kinds: vec![Kind::Service],
            service: Some("web".into()),
        };
        let mut reg = Event::new(Kind::Service, "registered");
        reg.service = Some("web".into());
        assert!(f.admits(&reg));
        reg.service = Some("db".into());
        assert!(!f.admits(&reg));
        assert!(!f.admits(&member("up", "a")));
        assert!(Kind::parse("nope").is_err());
    }
}
