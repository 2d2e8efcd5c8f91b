//! The CPU model: what each piece of a node's work costs, and machines
//! whose cores serve the work of every node placed on them.
//!
//! Each node is a process that handles its inputs one at a time, in order
//! (FIFO): the agent's membership task does. A machine shares its cores
//! among its processes that have work (processor sharing, as the kernel's
//! fair scheduler does): with `B` busy processes on `C` cores each gets
//! `min(1, C / B)` of a core. So a node with little to do is not stuck
//! behind a neighbour's queue of handshakes, but when many are busy, all
//! slow down together, which is what starves real agents on one machine.
//!
//! Processor sharing is computed with a virtual clock per machine (as in
//! weighted fair queueing): it advances at the share each busy process
//! gets, each process's job in service finishes at a fixed virtual instant,
//! and the machine's next completion is the smallest of those. The set of
//! busy processes changes only when a job starts or ends, so a machine
//! needs one pending event at a time: O(log n) per job.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// CPU time per piece of work, per side. The transport's costs come from
/// `transport/examples/handshake_cost.rs` (release build, this project's
/// 2-core reference machine); recalibrate with it and `--costs`. The
/// agent's own costs (`process_start_us`, `agent_input_us`,
/// `agent_stream_us`, `background_us_per_s`) are fitted to real agents'
/// formation times, CPU and idle CPU (`bench/scale.py`, see
/// docs/simulations.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Costs {
    /// One side of a full mutual-TLS QUIC handshake (each side signs once
    /// and verifies the other's chain).
    pub handshake_full_us: f64,
    /// One side of a handshake with a TLS session kept from an earlier
    /// connection to the same process.
    pub handshake_resumed_us: f64,
    /// Sending one SWIM datagram.
    pub datagram_send_us: f64,
    /// Receiving one SWIM datagram and handing it to the core.
    pub datagram_recv_us: f64,
    /// Sending or receiving one stream message (catalog fetch, entry,
    /// digest, or a member sync frame without its members).
    pub stream_message_us: f64,
    /// Encoding or merging one member of a member sync payload.
    pub sync_member_us: f64,
    /// Waking up for a timer (probe round, suspicion expiry, schedules).
    pub timer_us: f64,
    /// Starting the process, before it sends anything: exec, runtime,
    /// key and certificate loading, TLS configuration, listeners.
    pub process_start_us: f64,
    /// The agent's own work around every input it handles (datagram,
    /// stream message, timer), on top of the transport's: task wake-ups,
    /// channels, the driver's bookkeeping, logging and metrics.
    pub agent_input_us: f64,
    /// The agent's own work per stream message sent or received (catalog
    /// fetch and entry, digest, member sync frame), on top of
    /// `stream_message_us`: a task, encoding and decoding, the catalog.
    pub agent_stream_us: f64,
    /// Work a running process does every second whatever its traffic:
    /// runtime timers, the link sweep, acknowledgements, metrics.
    pub background_us_per_s: f64,
    /// Work a running process does every second per member it holds
    /// active, on top of `background_us_per_s`. 0 since the agent stopped
    /// keeping idle connections alive (that was what grew with the member
    /// table); kept to ask what a per-peer cost would do.
    pub member_us_per_s: f64,
}

impl Default for Costs {
    fn default() -> Self {
        Self {
            handshake_full_us: 378.3,
            handshake_resumed_us: 226.2,
            datagram_send_us: 1.77,
            datagram_recv_us: 1.77,
            stream_message_us: 3.0,
            sync_member_us: 2.0,
            timer_us: 2.0,
            process_start_us: 3_000.0,
            agent_input_us: 50.0,
            agent_stream_us: 265.0,
            background_us_per_s: 1_200.0,
            member_us_per_s: 0.0,
        }
    }
}

impl Costs {
    /// Checks that every cost is a finite, non-negative number.
    pub fn validate(&self) -> anyhow::Result<()> {
        let all = [
            ("handshake_full_us", self.handshake_full_us),
            ("handshake_resumed_us", self.handshake_resumed_us),
            ("datagram_send_us", self.datagram_send_us),
            ("datagram_recv_us", self.datagram_recv_us),
            ("stream_message_us", self.stream_message_us),
            ("sync_member_us", self.sync_member_us),
            ("timer_us", self.timer_us),
            ("process_start_us", self.process_start_us),
            ("agent_input_us", self.agent_input_us),
            ("agent_stream_us", self.agent_stream_us),
            ("background_us_per_s", self.background_us_per_s),
            ("member_us_per_s", self.member_us_per_s),
        ];
        for (name, v) in all {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "cost {name} = {v}: must be a non-negative number of microseconds"
            );
        }
        Ok(())
    }

    /// A cost in microseconds as a duration (whole nanoseconds).
    pub fn time(us: f64) -> Duration {
        Duration::from_nanos((us * 1e3).round() as u64)
    }
}

/// A pending completion: the caller queues an event for `machine` at `at`
/// and hands it back to [`Cpu::complete`] with `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The machine.
    pub machine: usize,
    /// When its next job finishes (if nothing changes before).
    pub at: Duration,
    /// Which schedule this is; older ones are ignored.
    pub epoch: u64,
}

/// A virtual instant, ordered totally.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tag(f64);

impl Eq for Tag {}

impl PartialOrd for Tag {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Tag {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug)]
struct Machine {
    /// Virtual time (ns of service each busy process has had).
    v: f64,
    /// When `v` was last brought up to date.
    updated: Duration,
    /// Processes with a job in service.
    busy: usize,
    /// (virtual finish, sequence, process, token) of each job in service.
    heap: BinaryHeap<Reverse<(Tag, u64, usize, u64)>>,
    epoch: u64,
    /// Integral of cores in use over time, in core-nanoseconds.
    busy_core_ns: f64,
}

#[derive(Debug)]
struct Proc<J> {
    machine: usize,
    /// (cost, submitted at, job); the front one is in service if `serving`.
    queue: VecDeque<(Duration, Duration, J)>,
    serving: bool,
    /// Bumped when the process stops: its heap entry becomes stale.
    token: u64,
    /// CPU time spent on this process's work.
    used: Duration,
}

/// Queueing delay figures: time from a job's submission to its end, minus
/// its own cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Waits {
    /// Jobs completed.
    pub jobs: u64,
    /// Sum of their waits.
    pub total: Duration,
    /// The longest.
    pub max: Duration,
}

/// Machines, their processes and the work queued on them.
#[derive(Debug)]
pub struct Cpu<J> {
    cores: f64,
    machines: Vec<Machine>,
    procs: Vec<Proc<J>>,
    seq: u64,
    dirty: Vec<usize>,
    waits: Waits,
}

impl<J> Cpu<J> {
    /// `procs` processes placed round-robin on `machines` machines of
    /// `cores` cores each.
    pub fn new(procs: usize, machines: usize, cores: u32) -> Self {
        let machines = machines.max(1);
        Self {
            cores: f64::from(cores.max(1)),
            machines: (0..machines)
                .map(|_| Machine {
                    v: 0.0,
                    updated: Duration::ZERO,
                    busy: 0,
                    heap: BinaryHeap::new(),
                    epoch: 0,
                    busy_core_ns: 0.0,
                })
                .collect(),
            procs: (0..procs)
                .map(|p| Proc {
                    machine: p % machines,
                    queue: VecDeque::new(),
                    serving: false,
                    token: 0,
                    used: Duration::ZERO,
                })
                .collect(),
            seq: 0,
            dirty: Vec::new(),
            waits: Waits::default(),
        }
    }

    /// The machine process `p` runs on.
    pub fn machine_of(&self, p: usize) -> usize {
        self.procs[p].machine
    }

    /// The share of a core each busy process of `m` gets now.
    fn rate(&self, m: usize) -> f64 {
        let busy = self.machines[m].busy.max(1) as f64;
        (self.cores / busy).min(1.0)
    }

    /// Brings machine `m`'s virtual clock to `now`.
    fn advance(&mut self, m: usize, now: Duration) {
        let rate = self.rate(m);
        let cores = self.cores;
        let mach = &mut self.machines[m];
        let dt = now.saturating_sub(mach.updated).as_nanos() as f64;
        if mach.busy > 0 {
            mach.v += dt * rate;
            mach.busy_core_ns += dt * (mach.busy as f64).min(cores);
        }
        mach.updated = now;
    }

    /// Queues `job` costing `cost` for process `p`: behind its other work,
    /// or (`first`) right after the job in service, if any.
    pub fn submit(&mut self, now: Duration, p: usize, cost: Duration, job: J, first: bool) {
        let proc = &mut self.procs[p];
        let item = (cost, now, job);
        if first {
            let at = usize::from(proc.serving).min(proc.queue.len());
            proc.queue.insert(at, item);
        } else {
            proc.queue.push_back(item);
        }
        if !self.procs[p].serving {
            self.serve(now, p);
        }
    }

    /// Starts the job at the front of `p`'s queue.
    fn serve(&mut self, now: Duration, p: usize) {
        let Some(&(cost, _, _)) = self.procs[p].queue.front() else {
            return;
        };
        let m = self.procs[p].machine;
        self.advance(m, now);
        self.seq += 1;
        let proc = &mut self.procs[p];
        proc.serving = true;
        let mach = &mut self.machines[m];
        let finish = mach.v + cost.as_nanos() as f64;
        mach.heap
            .push(Reverse((Tag(finish), self.seq, p, proc.token)));
        mach.busy += 1;
        self.dirty.push(m);
    }

    /// Drops everything queued for `p` (its process stopped).
    pub fn stop(&mut self, now: Duration, p: usize) {
        let m = self.procs[p].machine;
        if self.procs[p].serving {
            self.advance(m, now);
            self.machines[m].busy -= 1;
            self.dirty.push(m);
        }
        let proc = &mut self.procs[p];
        proc.queue.clear();
        proc.serving = false;
        proc.token += 1;
    }

    /// Machine `m`'s completion event for `epoch` fired: the job that
    /// finished and its process, or `None` if the schedule changed since.
    /// Call [`Cpu::resume`] for the process once the job is handled.
    pub fn complete(&mut self, now: Duration, m: usize, epoch: u64) -> Option<(usize, J)> {
        if self.machines[m].epoch != epoch {
            return None;
        }
        self.advance(m, now);
        let p = loop {
            let Reverse((Tag(finish), _, p, token)) = self.machines[m].heap.pop()?;
            if self.procs[p].token == token {
                let mach = &mut self.machines[m];
                // Rounding of the event time must not move the clock back.
                mach.v = mach.v.max(finish);
                break p;
            }
        };
        self.machines[m].busy -= 1;
        self.dirty.push(m);
        let proc = &mut self.procs[p];
        proc.serving = false;
        let (cost, submitted, job) = proc.queue.pop_front()?;
        proc.used += cost;
        let wait = now.saturating_sub(submitted).saturating_sub(cost);
        self.waits.jobs += 1;
        self.waits.total += wait;
        self.waits.max = self.waits.max.max(wait);
        Some((p, job))
    }

    /// Starts `p`'s next job, if it has one and none is in service.
    pub fn resume(&mut self, now: Duration, p: usize) {
        if !self.procs[p].serving {
            self.serve(now, p);
        }
    }

    /// The completion events to queue for machines whose schedule changed.
    pub fn wakes(&mut self, now: Duration) -> Vec<Wake> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let mut out = Vec::with_capacity(dirty.len());
        for &m in &dirty {
            self.advance(m, now);
            // Stale entries (stopped processes) at the top are dropped now.
            while let Some(Reverse((_, _, p, token))) = self.machines[m].heap.peek() {
                if self.procs[*p].token == *token {
                    break;
                }
                self.machines[m].heap.pop();
            }
            let rate = self.rate(m);
            let mach = &mut self.machines[m];
            mach.epoch += 1;
            let Some(Reverse((Tag(finish), ..))) = mach.heap.peek() else {
                continue;
            };
            let ahead = ((finish - mach.v) / rate).max(0.0).ceil() as u64;
            out.push(Wake {
                machine: m,
                at: now + Duration::from_nanos(ahead),
                epoch: mach.epoch,
            });
        }
        dirty.clear();
        self.dirty = dirty;
        out
    }

    /// CPU time spent on process `p`'s work so far.
    pub fn used(&self, p: usize) -> Duration {
        self.procs[p].used
    }

    /// Core-seconds machine `m` has been busy, up to `now`.
    pub fn busy_core_seconds(&mut self, m: usize, now: Duration) -> f64 {
        self.advance(m, now);
        self.machines[m].busy_core_ns / 1e9
    }

    /// Cores per machine.
    pub fn cores(&self) -> f64 {
        self.cores
    }

    /// Machines.
    pub fn machines(&self) -> usize {
        self.machines.len()
    }

    /// Queueing delays so far.
    pub fn waits(&self) -> Waits {
        self.waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Runs every job to completion; returns (process, job, finish time).
    fn drain(cpu: &mut Cpu<u32>, mut now: Duration) -> Vec<(usize, u32, Duration)> {
        let mut pending: Vec<Wake> = cpu.wakes(now);
        let mut done = Vec::new();
        while !pending.is_empty() {
            pending.sort_by_key(|w| (w.at, w.machine));
            let w = pending.remove(0);
            now = w.at;
            if let Some((p, job)) = cpu.complete(now, w.machine, w.epoch) {
                done.push((p, job, now));
                cpu.resume(now, p);
            }
            pending.retain(|old| old.machine != w.machine);
            pending.extend(cpu.wakes(now));
        }
        done
    }

    #[test]
    fn one_process_runs_its_jobs_in_order_at_full_speed() {
        let mut cpu = Cpu::new(1, 1, 2);
        cpu.submit(ms(0), 0, ms(3), 1, false);
        cpu.submit(ms(0), 0, ms(2), 2, false);
        let done = drain(&mut cpu, ms(0));
        assert_eq!(done, vec![(0, 1, ms(3)), (0, 2, ms(5))]);
        assert_eq!(cpu.used(0), ms(5));
    }

    #[test]
    fn busy_processes_share_the_cores() {
        // Four processes with 10 ms each on 2 cores: each gets half a core,
        // so all finish at 20 ms, not 10.
        let mut cpu = Cpu::new(4, 1, 2);
        for p in 0..4 {
            cpu.submit(ms(0), p, ms(10), p as u32, false);
        }
        let done = drain(&mut cpu, ms(0));
        assert!(done.iter().all(|&(_, _, t)| t == ms(20)), "{done:?}");
        assert!((cpu.busy_core_seconds(0, ms(20)) - 0.04).abs() < 1e-9);
        // On their own machines, each finishes at 10 ms.
        let mut apart = Cpu::new(4, 4, 2);
        for p in 0..4 {
            apart.submit(ms(0), p, ms(10), p as u32, false);
        }
        assert!(
            drain(&mut apart, ms(0))
                .iter()
                .all(|&(_, _, t)| t == ms(10))
        );
    }

    #[test]
    fn a_short_job_is_not_stuck_behind_a_neighbours_queue() {
        // Process 0 has 100 ms of work queued; process 1's 1 ms job on one
        // core shares it half and half: done at 2 ms.
        let mut cpu = Cpu::new(2, 1, 1);
        for j in 0..10 {
            cpu.submit(ms(0), 0, ms(10), j, false);
        }
        cpu.submit(ms(0), 1, ms(1), 99, false);
        let done = drain(&mut cpu, ms(0));
        assert_eq!(done[0], (1, 99, ms(2)));
        assert_eq!(done.last().unwrap().2, ms(101));
        assert_eq!(cpu.waits().max, ms(91));
    }

    #[test]
    fn a_first_job_goes_after_the_one_in_service() {
        let mut cpu = Cpu::new(1, 1, 1);
        cpu.submit(ms(0), 0, ms(5), 1, false);
        cpu.submit(ms(0), 0, ms(5), 2, false);
        cpu.submit(ms(1), 0, ms(1), 3, true);
        let order: Vec<u32> = drain(&mut cpu, ms(1)).iter().map(|d| d.1).collect();
        assert_eq!(order, vec![1, 3, 2]);
    }

    #[test]
    fn a_stopped_process_frees_its_share() {
        let mut cpu = Cpu::new(2, 1, 1);
        cpu.submit(ms(0), 0, ms(10), 1, false);
        cpu.submit(ms(0), 1, ms(10), 2, false);
        let _ = cpu.wakes(ms(0));
        cpu.stop(ms(4), 1);
        // 2 ms of service by 4 ms, then the whole core: done at 12 ms.
        assert_eq!(drain(&mut cpu, ms(4)), vec![(0, 1, ms(12))]);
    }

    #[test]
    fn costs_parse_from_a_partial_file() {
        let c: Costs = toml::from_str("handshake_full_us = 1500.0\n").unwrap();
        assert_eq!(c.handshake_full_us, 1500.0);
        assert_eq!(c.datagram_send_us, Costs::default().datagram_send_us);
        assert!(toml::from_str::<Costs>("typo_us = 1.0").is_err());
        assert!(
            Costs {
                timer_us: -1.0,
                ..Costs::default()
            }
            .validate()
            .is_err()
        );
        assert_eq!(Costs::time(4.8), Duration::from_nanos(4_800));
    }
}
