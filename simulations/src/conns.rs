//! The connection model: the QUIC connections (links) each node holds.
//!
//! Sending to a peer without a link first dials it: the message waits in
//! the dial's queue while the handshake takes a round trip and both sides'
//! CPU; then both sides hold the link and everything queued goes. The
//! first handshake from a node to a peer process is a full one; later ones
//! resume the TLS session the dialer kept for that process, until the peer
//! restarts. A node makes at most [`DIALS_AT_ONCE`] handshakes at a time
//! (the transport's `dials_at_once`); later dials wait their turn, and the
//! wait counts against the connect timeout, as in the transport. Which
//! links stay open is the agent's own policy,
//! [`LinkPolicy`], applied about once a second per node; SWIM's
//! `Disconnect` and `DisconnectStale` close links too. A link records the
//! life (process) of the peer it reached: once that process is gone, the
//! next send to the peer's new process dials again, as a stateless reset
//! would make the agent do.
//!
//! Tables are ordered maps so that a run depends on its seed alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use gossamer_membership::links::{Link, LinkPolicy};
use serde::Serialize;

/// Datagrams held per peer while its link is being made (the transport's
/// `pending_per_peer`).
pub const PENDING_DATAGRAMS: usize = 32;

/// Handshakes a node makes at once (the transport's `dials_at_once`).
pub const DIALS_AT_ONCE: usize = 8;

/// A dial whose handshake starts now: its first flight leaves for `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The peer.
    pub to: usize,
    /// The peer's process the dial was meant for.
    pub to_life: u32,
    /// The dial.
    pub id: u64,
    /// Whether the dialer holds a TLS session for that process.
    pub resumed: bool,
}

#[derive(Debug)]
enum State<P> {
    Open {
        last_active: Duration,
        peer_life: u32,
    },
    Dialing {
        id: u64,
        pending: Vec<P>,
        datagrams: usize,
    },
}

/// What became of a message for a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<P> {
    /// A link is open: send it now.
    Open(P),
    /// A dial is under way: it waits.
    Queued,
    /// A dial is under way and its queue of datagrams is full.
    Dropped(P),
    /// No link: a dial starts, or waits for its turn (the message waits
    /// in it either way).
    Dial {
        /// The dial, for [`Conns::established`] and [`Conns::failed`].
        id: u64,
        /// Whether the dialer holds a TLS session for this peer process.
        resumed: bool,
        /// Whether its handshake starts now (else when a turn frees up:
        /// [`Conns::dial_done`] returns it).
        now: bool,
    },
}

/// Handshakes and links of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Full handshakes this node dialed.
    pub dialled_full: u64,
    /// Resumed handshakes this node dialed.
    pub dialled_resumed: u64,
    /// Full handshakes this node accepted.
    pub accepted_full: u64,
    /// Resumed handshakes this node accepted.
    pub accepted_resumed: u64,
    /// Dials that got no answer (peer gone or cut off).
    pub failed: u64,
    /// Links closed by the policy (idle or over the cap).
    pub idle_closes: u64,
    /// Most links held at once.
    pub peak_links: usize,
}

impl LinkStats {
    /// Handshakes either side, full and resumed.
    pub fn handshakes(&self) -> u64 {
        self.dialled_full + self.dialled_resumed + self.accepted_full + self.accepted_resumed
    }
}

/// Every node's links, dials and kept TLS sessions.
#[derive(Debug)]
pub struct Conns<P> {
    tables: Vec<BTreeMap<usize, State<P>>>,
    /// Per node: peer -> the peer life its TLS session is for.
    tickets: Vec<HashMap<usize, u32>>,
    stats: Vec<LinkStats>,
    next_dial: u64,
    /// Per node: dials whose handshake is under way.
    in_flight: Vec<BTreeSet<u64>>,
    /// Per node: dials waiting for a turn, oldest first.
    waiting: Vec<VecDeque<Started>>,
    dials_at_once: usize,
}

impl<P> Conns<P> {
    /// No links among `n` nodes.
    pub fn new(n: usize) -> Self {
        Self {
            tables: (0..n).map(|_| BTreeMap::new()).collect(),
            tickets: (0..n).map(|_| HashMap::new()).collect(),
            stats: vec![LinkStats::default(); n],
            next_dial: 0,
            in_flight: vec![BTreeSet::new(); n],
            waiting: (0..n).map(|_| VecDeque::new()).collect(),
            dials_at_once: DIALS_AT_ONCE,
        }
    }

    /// Sets how many handshakes a node makes at once (at least 1).
    pub fn set_dials_at_once(&mut self, n: usize) {
        self.dials_at_once = n.max(1);
    }

    /// Whether `x`'s dial `id` has its handshake under way (not waiting,
    /// not finished, not timed out).
    pub fn in_flight(&self, x: usize, id: u64) -> bool {
        self.in_flight[x].contains(&id)
    }

    /// `x`'s dial `id` is over (answered, failed or timed out): its turn
    /// goes to the dials waiting, which are returned to be started. Dials
    /// that timed out or were overtaken while waiting are skipped.
    pub fn dial_done(&mut self, x: usize, id: u64) -> Vec<Started> {
        self.in_flight[x].remove(&id);
        let mut out = Vec::new();
        while self.in_flight[x].len() < self.dials_at_once {
            let Some(d) = self.waiting[x].pop_front() else {
                break;
            };
            if matches!(self.tables[x].get(&d.to), Some(State::Dialing { id, .. }) if *id == d.id) {
                self.in_flight[x].insert(d.id);
                out.push(d);
            }
        }
        out
    }

    fn note_peak(&mut self, x: usize) {
        let open = self.links(x);
        let s = &mut self.stats[x];
        s.peak_links = s.peak_links.max(open);
    }

    fn touch(&mut self, now: Duration, x: usize, y: usize, y_life: u32) {
        if let Some(State::Open {
            last_active,
            peer_life,
        }) = self.tables[x].get_mut(&y)
            && *peer_life == y_life
        {
            *last_active = now;
        }
    }

    /// Node `x` (process `x_life`) has `item` for `y`, whose process is
    /// `y_life`; `datagram` says whether the dial queue's cap applies.
    pub fn route(
        &mut self,
        now: Duration,
        (x, x_life): (usize, u32),
        (y, y_life): (usize, u32),
        item: P,
        datagram: bool,
    ) -> Route<P> {
        match self.tables[x].get_mut(&y) {
            Some(State::Open { peer_life, .. }) if *peer_life == y_life => {
                self.touch(now, x, y, y_life);
                self.touch(now, y, x, x_life);
                return Route::Open(item);
            }
            Some(State::Dialing {
                pending, datagrams, ..
            }) => {
                if datagram && *datagrams >= PENDING_DATAGRAMS {
                    return Route::Dropped(item);
                }
                *datagrams += usize::from(datagram);
                pending.push(item);
                return Route::Queued;
            }
            // A link to an earlier process of the peer, or none.
            Some(State::Open { .. }) | None => {}
        }
        self.next_dial += 1;
        let id = self.next_dial;
        let resumed = self.tickets[x].get(&y) == Some(&y_life);
        let s = &mut self.stats[x];
        if resumed {
            s.dialled_resumed += 1;
        } else {
            s.dialled_full += 1;
        }
        self.tables[x].insert(
            y,
            State::Dialing {
                id,
                pending: vec![item],
                datagrams: usize::from(datagram),
            },
        );
        let start = self.in_flight[x].len() < self.dials_at_once;
        if start {
            self.in_flight[x].insert(id);
        } else {
            self.waiting[x].push_back(Started {
                to: y,
                to_life: y_life,
                id,
                resumed,
            });
        }
        Route::Dial {
            id,
            resumed,
            now: start,
        }
    }

    /// `y` finished its side of a handshake `x` (process `x_life`) dialed:
    /// it holds the link now. Returns what `y` had queued for `x` in a dial
    /// of its own, which this link carries instead.
    pub fn accept(
        &mut self,
        now: Duration,
        y: usize,
        (x, x_life): (usize, u32),
        resumed: bool,
    ) -> Vec<P> {
        let s = &mut self.stats[y];
        if resumed {
            s.accepted_resumed += 1;
        } else {
            s.accepted_full += 1;
        }
        let open = State::Open {
            last_active: now,
            peer_life: x_life,
        };
        // A dial of its own to `x` under way goes on (both sides dialed at
        // once), but what it carried goes on this link.
        let pending = match self.tables[y].insert(x, open) {
            Some(State::Dialing { pending, .. }) => pending,
            _ => Vec::new(),
        };
        self.note_peak(y);
        pending
    }

    /// `x`'s dial `id` to `y` (process `y_life`) completed: `x` holds the
    /// link and keeps a TLS session for that process. Returns what waited.
    pub fn established(
        &mut self,
        now: Duration,
        x: usize,
        (y, y_life): (usize, u32),
        id: u64,
    ) -> Vec<P> {
        self.tickets[x].insert(y, y_life);
        let open = State::Open {
            last_active: now,
            peer_life: y_life,
        };
        let pending = match self.tables[x].get_mut(&y) {
            Some(State::Dialing { id: d, .. }) if *d != id => return Vec::new(),
            Some(State::Open { last_active, .. }) => {
                *last_active = now;
                return Vec::new();
            }
            _ => match self.tables[x].insert(y, open) {
                Some(State::Dialing { pending, .. }) => pending,
                _ => Vec::new(),
            },
        };
        self.note_peak(x);
        pending
    }

    /// `x`'s dial `id` to `y` got no answer: returns what waited in it.
    pub fn failed(&mut self, x: usize, y: usize, id: u64) -> Vec<P> {
        match self.tables[x].get(&y) {
            Some(State::Dialing { id: d, .. }) if *d == id => {}
            _ => return Vec::new(),
        }
        self.stats[x].failed += 1;
        match self.tables[x].remove(&y) {
            Some(State::Dialing { pending, .. }) => pending,
            _ => Vec::new(),
        }
    }

    /// Closes the link between `x` (process `x_life`) and `y`, on both
    /// sides (closing a QUIC connection closes it for the peer too).
    /// Dials under way are left alone, as the transport does.
    pub fn close(&mut self, x: usize, x_life: u32, y: usize) {
        if matches!(self.tables[x].get(&y), Some(State::Open { .. })) {
            self.tables[x].remove(&y);
        }
        if matches!(self.tables[y].get(&x), Some(State::Open { peer_life, .. }) if *peer_life == x_life)
        {
            self.tables[y].remove(&x);
        }
    }

    /// Closes `x`'s link to `y` if it reached a process other than
    /// `y_life` (the peer restarted).
    pub fn close_stale(&mut self, x: usize, y: usize, y_life: u32) {
        if matches!(self.tables[x].get(&y), Some(State::Open { peer_life, .. }) if *peer_life != y_life)
        {
            self.tables[x].remove(&y);
        }
    }

    /// The peers whose links `x` closes now under `policy` (the caller
    /// closes them with [`Conns::close`]).
    pub fn sweep(&mut self, now: Duration, x: usize, policy: &LinkPolicy) -> Vec<usize> {
        let mut links: Vec<Link<usize>> = self.tables[x]
            .iter()
            .filter_map(|(&y, s)| match s {
                State::Open { last_active, .. } => Some(Link {
                    key: y,
                    last_active: *last_active,
                    // Fetches and syncs are single round trips: not modelled
                    // as streams holding a link open.
                    streams: 0,
                    primary: true,
                }),
                State::Dialing { .. } => None,
            })
            .collect();
        let mut out = Vec::new();
        policy.to_close(now, &mut links, &mut out);
        self.stats[x].idle_closes += out.len() as u64;
        out
    }

    /// `x`'s process stopped: its links, dials and sessions are gone.
    pub fn reset(&mut self, x: usize) {
        self.tables[x].clear();
        self.tickets[x].clear();
        self.in_flight[x].clear();
        self.waiting[x].clear();
    }

    /// Links `x` holds open.
    pub fn links(&self, x: usize) -> usize {
        self.tables[x]
            .values()
            .filter(|s| matches!(s, State::Open { .. }))
            .count()
    }

    /// `x`'s handshake and link figures.
    pub fn stats(&self, x: usize) -> LinkStats {
        self.stats[x]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    /// Dials and completes a link from 0 to 1 at `now`; returns whether the
    /// handshake was resumed.
    fn connect(c: &mut Conns<u32>, now: Duration, lives: (u32, u32)) -> bool {
        let Route::Dial { id, resumed, .. } = c.route(now, (0, lives.0), (1, lives.1), 7, true)
        else {
            panic!("expected a dial");
        };
        assert!(c.accept(now, 1, (0, lives.0), resumed).is_empty());
        assert_eq!(c.established(now, 0, (1, lives.1), id), vec![7]);
        resumed
    }

    #[test]
    fn sends_wait_for_the_dial_then_use_the_link() {
        let mut c = Conns::new(2);
        let Route::Dial { id, resumed, .. } = c.route(s(0), (0, 1), (1, 1), 1, true) else {
            panic!()
        };
        assert!(!resumed);
        assert_eq!(c.route(s(0), (0, 1), (1, 1), 2, true), Route::Queued);
        c.accept(s(0), 1, (0, 1), false);
        assert_eq!(c.established(s(0), 0, (1, 1), id), vec![1, 2]);
        assert_eq!(c.route(s(0), (0, 1), (1, 1), 3, true), Route::Open(3));
        // Both sides hold it: the peer answers without a dial.
        assert_eq!(c.route(s(0), (1, 1), (0, 1), 4, true), Route::Open(4));
        assert_eq!((c.links(0), c.links(1)), (1, 1));
        assert_eq!(c.stats(0).dialled_full, 1);
        assert_eq!(c.stats(1).accepted_full, 1);
    }

    #[test]
    fn an_idle_link_closes_and_the_next_send_resumes() {
        let policy = LinkPolicy {
            idle: Duration::from_secs(10),
            ..LinkPolicy::default()
        };
        let mut c = Conns::new(2);
        assert!(!connect(&mut c, s(0), (1, 1)));
        assert!(c.sweep(s(5), 0, &policy).is_empty());
        assert_eq!(c.sweep(s(10), 0, &policy), vec![1]);
        c.close(0, 1, 1);
        assert_eq!((c.links(0), c.links(1)), (0, 0));
        assert!(
            connect(&mut c, s(11), (1, 1)),
            "second handshake is resumed"
        );
        assert!(connect_again_after_restart(&mut c));
    }

    /// After the peer restarts (new life), the old link is stale and the
    /// session is for the old process: a full handshake.
    fn connect_again_after_restart(c: &mut Conns<u32>) -> bool {
        c.reset(1);
        !connect(c, s(12), (1, 2))
    }

    #[test]
    fn traffic_keeps_a_link_open() {
        let policy = LinkPolicy {
            idle: Duration::from_secs(10),
            ..LinkPolicy::default()
        };
        let mut c = Conns::new(2);
        connect(&mut c, s(0), (1, 1));
        assert_eq!(c.route(s(8), (1, 1), (0, 1), 9, true), Route::Open(9));
        assert!(
            c.sweep(s(12), 0, &policy).is_empty(),
            "the peer's send counts"
        );
    }

    #[test]
    fn a_failed_dial_returns_its_queue_and_the_dial_queue_is_capped() {
        let mut c = Conns::new(2);
        let Route::Dial { id, .. } = c.route(s(0), (0, 1), (1, 1), 0, true) else {
            panic!()
        };
        for i in 1..PENDING_DATAGRAMS as u32 {
            assert_eq!(c.route(s(0), (0, 1), (1, 1), i, true), Route::Queued);
        }
        assert_eq!(c.route(s(0), (0, 1), (1, 1), 99, true), Route::Dropped(99));
        assert_eq!(c.route(s(0), (0, 1), (1, 1), 100, false), Route::Queued);
        assert_eq!(c.failed(0, 1, id).len(), PENDING_DATAGRAMS + 1);
        assert_eq!(c.stats(0).failed, 1);
        assert_eq!(c.links(0), 0);
    }

    #[test]
    fn an_inbound_link_carries_what_waited_for_our_own_dial() {
        let mut c = Conns::new(2);
        let Route::Dial { id, .. } = c.route(s(0), (1, 1), (0, 1), 5, true) else {
            panic!()
        };
        // 0 dials 1 at the same time; 1 accepts first.
        let Route::Dial { .. } = c.route(s(0), (0, 1), (1, 1), 6, true) else {
            panic!()
        };
        assert_eq!(c.accept(s(0), 1, (0, 1), false), vec![5]);
        // 1's own dial completes later: a second handshake, nothing left.
        assert!(c.established(s(0), 1, (0, 1), id).is_empty());
        assert_eq!(c.links(1), 1);
    }

    #[test]
    fn dials_beyond_the_limit_wait_for_a_turn() {
        let n = DIALS_AT_ONCE + 2;
        let mut c = Conns::new(n + 1);
        let mut ids = Vec::new();
        for y in 1..=n {
            let Route::Dial { id, now, .. } = c.route(s(0), (0, 1), (y, 1), 0, true) else {
                panic!("expected a dial");
            };
            assert_eq!(now, y <= DIALS_AT_ONCE, "dial {y}");
            ids.push(id);
        }
        assert!(c.in_flight(0, ids[0]) && !c.in_flight(0, ids[DIALS_AT_ONCE]));
        // The first one times out while the last but one waits: that one
        // starts. The last one timed out while waiting: it is skipped.
        assert_eq!(c.failed(0, n, ids[n - 1]).len(), 1);
        let started = c.dial_done(0, ids[0]);
        assert_eq!(started.len(), 1);
        assert_eq!((started[0].to, started[0].id), (n - 1, ids[n - 2]));
        assert!(c.in_flight(0, ids[n - 2]));
        assert!(c.dial_done(0, ids[1]).is_empty(), "nobody waits any more");
        c.reset(0);
        assert!(!c.in_flight(0, ids[2]));
    }

    #[test]
    fn stale_links_close() {
        let mut c = Conns::new(2);
        connect(&mut c, s(0), (1, 1));
        c.close_stale(0, 1, 1);
        assert_eq!(c.links(0), 1);
        c.close_stale(0, 1, 2);
        assert_eq!(c.links(0), 0);
    }
}
