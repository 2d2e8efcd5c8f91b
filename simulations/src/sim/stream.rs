//! Stream messages: catalog fetches and digests, and push-pull member
//! syncs, each a one-way message on a simulated stream.

use gossamer_membership::docs::{DocKey, DocRef, DocStamp};
use gossamer_membership::sync::SyncPayload;

use super::Sim;
use super::host::Out;
use super::queue::Ev;

#[derive(Debug)]
pub(super) enum StreamMsg {
    /// "Send me your entry."
    Fetch { from: usize, from_life: u32 },
    /// The owner's answer.
    Entry { owner: usize, version: u64 },
    /// A fetch that could not reach the owner's process.
    FetchFailed { owner: usize },
    /// A catalog digest; the receiver answers with its own unless this is
    /// the answer.
    Digest {
        from: usize,
        from_life: u32,
        digest: Vec<(String, u64)>,
        answer: bool,
    },
    /// "Send me this document."
    DocFetch {
        from: usize,
        from_life: u32,
        key: DocKey,
    },
    /// The answer: the stamp the holder has, if any.
    DocGot {
        holder: usize,
        key: DocKey,
        stamp: Option<DocStamp>,
    },
    /// A document comparison: the opener's summary and list (the agent
    /// sends the list only when the summaries differ, in a second frame).
    DocCompare {
        from: usize,
        from_life: u32,
        summary: u128,
        list: Vec<DocRef>,
    },
    /// The answer to a comparison: the peer's list, or `None` if the same.
    DocAnswer {
        peer: usize,
        list: Option<Vec<DocRef>>,
    },
    /// A push-pull member sync: the sender's encoded view; the receiver
    /// merges it and answers with its own unless this is the answer.
    Members {
        from: usize,
        from_life: u32,
        payload: Vec<u8>,
        answer: bool,
        /// Whether the initiator gossips news from the answer on.
        gossip: bool,
    },
}

impl Sim {
    /// Sends a stream message from `from` to the process now running on
    /// `to`; false if it cannot get there.
    pub(super) fn stream(&mut self, from: usize, to: usize, msg: StreamMsg) -> bool {
        let to_life = self.nodes[to].life;
        self.stream_to_life(from, to, to_life, msg)
    }

    fn stream_to_life(&mut self, from: usize, to: usize, to_life: u32, msg: StreamMsg) -> bool {
        self.counters.stream_messages += 1;
        if self.nodes[to].driver.is_none() || self.net.separated(from, to) {
            self.counters.stream_failures += 1;
            return false;
        }
        if self.host.is_some() {
            self.nodes[from]
                .outbox
                .push(Out::Stream { to, to_life, msg });
            return true;
        }
        let at = self.now + self.net.stream_delay();
        self.queue.push(at, Ev::Stream { to, to_life, msg });
        true
    }

    /// A stream message that could not reach `to`: a fetch among them still
    /// ends, as the agent's does.
    pub(super) fn stream_failed(&mut self, to: usize, msg: StreamMsg) {
        match msg {
            StreamMsg::Fetch { from, from_life } => self.fetch_failed(from, from_life, to),
            StreamMsg::DocFetch {
                from,
                from_life,
                key,
            } => {
                let at = self.now + self.net.stream_delay() * 2;
                let msg = StreamMsg::DocGot {
                    holder: to,
                    key,
                    stamp: None,
                };
                self.queue.push(
                    at,
                    Ev::Stream {
                        to: from,
                        to_life: from_life,
                        msg,
                    },
                );
            }
            _ => {}
        }
    }

    /// `x`'s fetch from `owner` ends without an entry, a round trip later;
    /// like the agent's, every fetch ends one way or the other.
    pub(super) fn fetch_failed(&mut self, x: usize, life: u32, owner: usize) {
        let at = self.now + self.net.stream_delay() * 2;
        let msg = StreamMsg::FetchFailed { owner };
        self.queue.push(
            at,
            Ev::Stream {
                to: x,
                to_life: life,
                msg,
            },
        );
    }

    pub(super) fn on_stream(&mut self, to: usize, to_life: u32, msg: StreamMsg) {
        if self.nodes[to].life != to_life {
            self.counters.stream_failures += 1;
            self.stream_failed(to, msg);
            return;
        }
        let now = self.now;
        match msg {
            StreamMsg::Fetch { from, from_life } => {
                let version = self.nodes[to].catalog_version;
                let reply = StreamMsg::Entry { owner: to, version };
                if !self.stream_to_life(to, from, from_life, reply) {
                    self.fetch_failed(from, from_life, to);
                }
                // As the agent: a peer fetching our entry is a contact.
                let name = self.names[from].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    d.handle_contact(now, &name);
                }
                self.flush(to);
            }
            StreamMsg::Entry { owner, version } => {
                self.catalogs.fetched_entry(to, owner, version, now);
                let name = self.names[owner].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    d.handle_fetched(now, &name, Some(version));
                }
                self.flush(to);
            }
            StreamMsg::FetchFailed { owner } => {
                let name = self.names[owner].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    d.handle_fetched(now, &name, None);
                }
                self.flush(to);
            }
            StreamMsg::Digest {
                from,
                from_life,
                digest,
                answer,
            } => {
                let name = self.names[from].clone();
                let Some(d) = self.nodes[to].driver.as_mut() else {
                    return;
                };
                let ours = (!answer).then(|| d.replica().digest());
                d.handle_digest(now, &name, &digest);
                self.flush(to);
                if let Some(ours) = ours {
                    let reply = StreamMsg::Digest {
                        from: to,
                        from_life: to_life,
                        digest: ours,
                        answer: true,
                    };
                    self.stream_to_life(to, from, from_life, reply);
                }
            }
            StreamMsg::Members {
                from,
                from_life,
                payload,
                answer,
                gossip,
            } => self.on_members(to, from, from_life, &payload, answer, gossip),
            StreamMsg::DocFetch {
                from,
                from_life,
                key,
            } => {
                let stamp = self.nodes[to]
                    .driver
                    .as_ref()
                    .and_then(|d| d.docs().held(&key));
                let reply = StreamMsg::DocGot {
                    holder: to,
                    key: key.clone(),
                    stamp,
                };
                if !self.stream_to_life(to, from, from_life, reply) {
                    let msg = StreamMsg::DocFetch {
                        from,
                        from_life,
                        key,
                    };
                    self.stream_failed(to, msg);
                }
            }
            StreamMsg::DocGot { holder, key, stamp } => {
                let name = self.names[holder].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    // The agent checks and stores what it got; what it
                    // holds after that is the higher of the two.
                    let got = stamp.map(|s| d.docs().held(&key).map_or(s, |h| h.max(s)));
                    d.handle_doc_fetched(now, &key, &name, got);
                }
                self.flush(to);
            }
            StreamMsg::DocCompare {
                from,
                from_life,
                summary,
                list,
            } => {
                let name = self.names[from].clone();
                let Some(d) = self.nodes[to].driver.as_mut() else {
                    return;
                };
                let ours = if d.docs().summary() == summary {
                    None
                } else {
                    let ours = d.docs().list();
                    d.handle_doc_list(now, &name, &list);
                    Some(ours)
                };
                self.flush(to);
                let reply = StreamMsg::DocAnswer {
                    peer: to,
                    list: ours,
                };
                self.stream_to_life(to, from, from_life, reply);
            }
            StreamMsg::DocAnswer { peer, list } => {
                let name = self.names[peer].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    match list {
                        Some(list) => d.handle_doc_list(now, &name, &list),
                        None => d.handle_docs_same(),
                    }
                }
                self.flush(to);
            }
        }
    }

    /// A member sync frame reached `to`: the answering side merges it and
    /// answers with the view it held before; the initiator merges the
    /// answer.
    fn on_members(
        &mut self,
        to: usize,
        from: usize,
        from_life: u32,
        payload: &[u8],
        answer: bool,
        gossip: bool,
    ) {
        let now = self.now;
        let Some(driver) = self.nodes[to].driver.as_mut() else {
            return;
        };
        let Ok(theirs) = SyncPayload::decode(payload) else {
            self.counters.refused += 1;
            return;
        };
        let ours = if answer {
            driver.handle_sync_answer(now, theirs, gossip);
            None
        } else {
            driver.handle_sync_request(now, theirs).ok()
        };
        self.flush(to);
        if let Some(ours) = ours {
            self.counters.sync_bytes += ours.len() as u64;
            let reply = StreamMsg::Members {
                from: to,
                from_life: self.nodes[to].life,
                payload: ours,
                answer: true,
                gossip,
            };
            self.stream_to_life(to, from, from_life, reply);
        }
    }
}
