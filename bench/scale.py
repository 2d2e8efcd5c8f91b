#!/usr/bin/env python3
"""N real agents on one machine: formation, footprint, detection, spread, and
recovery from CPU starvation (see docs/operations.md, "Sizing").

Every agent is one `gossamer agent` process on loopback with an explicit port
for each listener (QUIC, admin, proxy) and the first three agents as seeds.
Each stands for a host of its own, so by default they send each other
Ethernet-sized QUIC packets (--loopback-mtu).
Certificates are issued before the first start. The phases, in order:

  form     start all agents back to back (spread over --start-over seconds);
           formed = the first poll round in which every agent lists every
           other one alive, timed from the last start
  idle     sample RSS, CPU time and QUIC connections per agent over
           --idle seconds, after a --settle pause
  hold     (--hold S) watch for S seconds that nobody lists anybody down
  catalog  register a service on one agent; seconds until each agent merged
           it (from the agents' own log lines, polled gently meanwhile)
  config   apply a signed route document at one agent; seconds until each
           agent applied it (from their logs)
  kill     kill -9 one agent; seconds until each observer declared it down
           (from the observers' logs)
  starve   SIGSTOP every agent, or run CPU hogs at real-time priority, for
           --starve-for seconds; then seconds until every agent lists every
           other live one alive again

Writes OUT/result.json and prints a summary. Example:

  cargo build --release -p gossamer-node
  python3 bench/scale.py --gossamer target/release/gossamer --nodes 100 --out /tmp/scale-100
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
# The agent that --wrap runs under a profiler (not a seed, so it joins as most do).
WRAPPED = "n0004"


def free_ports(n_udp, n_tcp):
    """Distinct ports the kernel says are free now (held open until all
    are chosen, so none repeats)."""
    held, out_udp, out_tcp = [], [], []
    for _ in range(n_udp):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        out_udp.append(s.getsockname()[1])
    for _ in range(n_tcp):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        out_tcp.append(s.getsockname()[1])
    for s in held:
        s.close()
    return out_udp, out_tcp


class Agent:
    def __init__(self, args, root, i, quic, admin, proxy):
        self.name = f"n{i:04d}"
        self.quic, self.admin, self.proxy = quic, admin, proxy
        self.root = root
        self.args = args
        self.proc = None
        self.conn = None

    def start(self, seeds):
        certs = self.root / "certs"
        data = self.root / "data" / self.name
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.args.gossamer, "agent", "--name", self.name,
            "--bind", f"127.0.0.1:{self.quic}",
            "--admin", f"127.0.0.1:{self.admin}",
            "--proxy", f"127.0.0.1:{self.proxy}",
            "--ca", str(self.root / "ca" / "ca.pem"),
            "--cert", str(certs / f"{self.name}.pem"),
            "--key", str(certs / f"{self.name}.key"),
            "--data-dir", str(data),
            "--log-level", self.args.log_level,
        ]
        for s in seeds:
            cmd += ["--seed", s]
        cmd += self.args.agent_arg
        if self.args.wrap and self.name == WRAPPED:
            cmd = self.args.wrap.split() + cmd
        log = open(self.root / "logs" / f"{self.name}.log", "ab")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        # Each agent stands for a host of its own, whose connections to the
        # others would cross a network in Ethernet-sized packets; on
        # loopback an agent would otherwise send its neighbours 16 KiB ones
        # and keep a send buffer that size per connection.
        if self.args.loopback_mtu:
            env["GOSSAMER_LOOPBACK_MTU"] = str(self.args.loopback_mtu)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def get(self, path, timeout=5.0):
        """GET over a kept-alive connection; None on any failure."""
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=timeout)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                body = r.read()
                return body if r.status == 200 else None
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return None

    def put(self, path, body):
        c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        c.request("PUT", path, body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status

    def states(self):
        """name -> state as this agent lists it (itself excluded). A member
        that restarted may still be listed down under its old generation
        next to its new one; the newest generation is its state."""
        body = self.get("/v1/members")
        if body is None:
            return None
        try:
            newest = {}
            for m in json.loads(body):
                if m.get("is_self"):
                    continue
                seen = newest.get(m["name"])
                if seen is None or m.get("generation", 0) >= seen[0]:
                    newest[m["name"]] = (m.get("generation", 0), m["state"])
            return {n: st for n, (_, st) in newest.items()}
        except (ValueError, KeyError, TypeError):
            return None

    def metric(self, name):
        """The sum of every series of metric `name` (all label values)."""
        body = self.get("/metrics")
        if body is None:
            return None
        total, found = 0.0, False
        for line in body.decode().splitlines():
            k, _, v = line.rpartition(" ")
            if k == name or k.startswith(name + "{"):
                total += float(v)
                found = True
        return total if found else None

    def rss_kib(self, field="VmRSS"):
        """Resident memory in KiB: `VmRSS` in all, or its parts `RssAnon`
        (the agent's own memory) and `RssFile` (pages of the binary, shared
        by every agent on the host but counted in each one's RSS)."""
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def wakeups(self):
        """Context switches of all the agent's threads so far: how often it
        woke up (voluntary) or was preempted (involuntary)."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                for line in open(f"/proc/{self.proc.pid}/task/{tid}/status"):
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            return None
        return total

    def thread_cpu_seconds(self):
        """CPU time of the agent's live threads, to the nanosecond (from
        schedstat; `cpu_seconds` counts in 10 ms clock ticks, too coarse for
        an idle agent over a short window)."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                total += int(open(f"/proc/{self.proc.pid}/task/{tid}/schedstat").read().split()[0])
        except (OSError, IndexError, ValueError):
            return None
        return total / 1e9

    def cpu_seconds(self):
        try:
            f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / TICK
        except (OSError, IndexError, ValueError):
            return None


def summary(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0}
    return {"n": len(v), "median": statistics.median(v), "max": v[-1], "min": v[0]}


def log_lines(agents, needle):
    """Lines containing `needle` in every agent's log so far."""
    n = 0
    for a in agents:
        try:
            with open(a.root / "logs" / f"{a.name}.log", "rb") as f:
                n += sum(1 for line in f if needle in line)
        except OSError:
            pass
    return n


def all_alive(agents, expect, deadline, what, bracket=None):
    """Polls rounds until every running agent lists every name in `expect`
    (minus itself) alive. Returns seconds from the call to the moment it
    happened, or None at the deadline: the middle of the bracket between
    the last poll that found a gap and the end of the first complete round
    (figures before 2026-12-03 took the start of that round). `bracket`, if
    given, receives the bracket's two ends."""
    t0 = time.monotonic()
    last = ""
    gap = None
    last_gap_at = t0
    while time.monotonic() - t0 < deadline:
        round_start = time.monotonic()
        ok = True
        worst = None
        for a in agents:
            if not a.alive():
                continue
            st = a.states()
            polled = time.monotonic()
            want = expect - {a.name}
            n_alive = 0 if st is None else sum(1 for n in want if st.get(n) == "alive")
            if n_alive != len(want):
                ok = False
                if worst is None or n_alive < worst[1]:
                    worst = (a.name, n_alive)
                missing = sorted(n for n in want if st is None or st.get(n) != "alive")
                gap = (a.name, [(n, (st or {}).get(n, "unknown")) for n in missing[:3]])
                last_gap_at = polled
                break
        if ok:
            round_end = time.monotonic()
            if gap is not None:
                # What held formation up last: which observer lacked whom.
                print(f"  {what}: the last gap seen, {time.monotonic() - t0:.1f} s in: "
                      f"{gap[0]} listed " + ", ".join(f"{n} as {s}" for n, s in gap[1]), flush=True)
            if bracket is not None:
                bracket.extend([last_gap_at - t0, round_end - t0])
            return (last_gap_at + round_end) / 2 - t0
        last = f"{worst[0]} lists {worst[1]} of {len(expect) - 1} alive" if worst else ""
        # At most half of one core for this poller: a full round over
        # hundreds of agents takes a while, and the agents need the CPU.
        time.sleep(max(0.2, time.monotonic() - round_start))
    print(f"  {what}: not reached in {deadline} s ({last})", flush=True)
    return None


def udp_errors():
    """The kernel's UDP counters that mean lost datagrams (all sockets)."""
    try:
        lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Udp:")]
    except OSError:
        return {}
    head, values = lines[0][1:], [int(v) for v in lines[1][1:]]
    return {k: v for k, v in zip(head, values) if k in ("RcvbufErrors", "SndbufErrors", "InErrors")}


def drops(agents):
    """Datagrams the agents' transports dropped, by reason (all agents)."""
    out = {}
    for reason in ("inbound_queue_full", "outbound_undeliverable"):
        name = f'gossamer_transport_dropped_total{{reason="{reason}"}}'
        out[reason] = sum(a.metric(name) or 0 for a in agents)
    out["member_syncs_failed"] = sum(a.metric('gossamer_member_syncs_total{result="error"}') or 0 for a in agents)
    out["repair_swaps"] = log_lines(agents, b"never heard of")
    return out


def phase_form(args, agents):
    udp0 = udp_errors()
    seeds = [f"127.0.0.1:{a.quic}" for a in agents[:3]]
    gap = args.start_over / max(1, len(agents) - 1)
    t0 = time.monotonic()
    for i, a in enumerate(agents):
        target = t0 + i * gap
        now = time.monotonic()
        if target > now:
            time.sleep(target - now)
        a.start([s for s in seeds if s != f"127.0.0.1:{a.quic}"])
    last_start_wall = time.time()
    started = time.monotonic() - t0
    print(f"form: started {len(agents)} agents in {started:.1f} s", flush=True)
    names = {a.name for a in agents}
    bracket = []
    formed = all_alive(agents, names, args.form_deadline, "formation", bracket)
    cpu = [a.cpu_seconds() for a in agents]
    total = sum(c for c in cpu if c is not None)
    downs = log_lines(agents, b'"member down"')
    renewals = log_lines(agents, b'"member restarted"')
    refuted = sum(a.metric("gossamer_swim_refuted_suspicions_total") or 0 for a in agents)
    within = f" (±{(bracket[1] - bracket[0]) / 2:.2f})" if bracket else ""
    print(f"form: every agent lists every other alive {formed if formed is None else round(formed, 2)}{within} s after the last start; "
          f"the agents used {total:.1f} CPU seconds so far (median {summary(cpu).get('median', 0):.2f} each)", flush=True)
    print(f"form: {downs} member-down and {renewals} member-restarted log lines (all agents); {refuted:.0f} suspicions refuted", flush=True)
    udp1 = udp_errors()
    lost = {k: udp1[k] - udp0.get(k, 0) for k in udp1}
    dropped = drops(agents)
    print(f"form: datagrams lost: kernel UDP {lost}; agents' transports {dropped}", flush=True)
    known = pairs_known(agents, last_start_wall)
    if known:
        print(f"form: from the agents' logs, 99 % of pairs known {known['p99']:.2f} s and every pair {known['all']:.2f} s "
              f"after the last start (suspects included; the poll above wants every pair alive)", flush=True)
    return {"started_over_s": started, "formed_after_last_start_s": formed, "formed_bracket_s": bracket, "pairs_known_from_logs": known, "cpu_seconds_total": total, "cpu_seconds": summary(cpu),
            "down_log_lines": downs, "restarted_log_lines": renewals, "refuted_suspicions": refuted,
            "udp_errors": lost, "transport_drops": dropped}


def phase_idle(args, agents):
    time.sleep(args.settle)
    cpu0 = {a.name: a.thread_cpu_seconds() for a in agents}
    wake0 = {a.name: a.wakeups() for a in agents}
    hs0 = {a.name: a.metric("gossamer_transport_handshakes_total") for a in agents}
    t0 = time.monotonic()
    conns = []
    rss_peak = {}
    steps = max(1, int(args.idle // 5))
    for _ in range(steps):
        time.sleep(args.idle / steps)
        for a in agents:
            r = a.rss_kib()
            if r is not None:
                rss_peak[a.name] = max(r, rss_peak.get(a.name, 0))
    elapsed = time.monotonic() - t0
    cpu = []
    for a in agents:
        c1 = a.thread_cpu_seconds()
        if c1 is not None and cpu0.get(a.name) is not None:
            cpu.append(100.0 * (c1 - cpu0[a.name]) / elapsed)
    wakes = []
    for a in agents:
        w1 = a.wakeups()
        if w1 is not None and wake0.get(a.name) is not None:
            wakes.append((w1 - wake0[a.name]) / elapsed)
    hs_rate = []
    for a in agents:
        conns.append(a.metric("gossamer_transport_connections"))
        h1 = a.metric("gossamer_transport_handshakes_total")
        if h1 is not None and hs0.get(a.name) is not None:
            hs_rate.append(60.0 * (h1 - hs0[a.name]) / elapsed)
    def rss(field):
        return summary(r / 1024.0 for r in (a.rss_kib(field) for a in agents) if r is not None)

    out = {
        "rss_mb": rss("VmRSS"),
        "rss_anon_mb": rss("RssAnon"),
        "rss_file_mb": rss("RssFile"),
        "cpu_percent": summary(cpu),
        "wakeups_per_s": summary(wakes),
        "quic_connections": summary(conns),
        "handshakes": summary(a.metric("gossamer_transport_handshakes_total") for a in agents),
        "resumed_handshakes": summary(a.metric("gossamer_transport_resumed_handshakes_total") for a in agents),
        "idle_closed": summary(a.metric("gossamer_transport_idle_closed_total") for a in agents),
        "handshakes_per_minute_idle": summary(hs_rate),
    }
    print(
        "idle: RSS MB median {:.1f} max {:.1f}; CPU % median {:.2f} max {:.2f}; QUIC connections median {} max {}".format(
            out["rss_mb"].get("median", 0), out["rss_mb"].get("max", 0),
            out["cpu_percent"].get("median", 0), out["cpu_percent"].get("max", 0),
            out["quic_connections"].get("median"), out["quic_connections"].get("max")),
        flush=True,
    )
    print(
        "idle: of the RSS, the agent's own (RssAnon) MB median {:.1f} max {:.1f}; the binary's pages (RssFile) median {:.1f} max {:.1f}".format(
            out["rss_anon_mb"].get("median", 0), out["rss_anon_mb"].get("max", 0),
            out["rss_file_mb"].get("median", 0), out["rss_file_mb"].get("max", 0)),
        flush=True,
    )
    print(
        "idle: thread wake-ups per agent per second median {:.1f} max {:.1f}; CPU per wake-up {:.0f} us".format(
            out["wakeups_per_s"].get("median", 0), out["wakeups_per_s"].get("max", 0),
            1e4 * out["cpu_percent"].get("median", 0) / max(out["wakeups_per_s"].get("median", 0), 1e-9)),
        flush=True,
    )
    print(
        "idle: handshakes per agent so far median {} (resumed, accepted side: {}); closed idle: {}; "
        "handshakes per agent per minute while idle: median {:.1f}".format(
            out["handshakes"].get("median"), out["resumed_handshakes"].get("median"), out["idle_closed"].get("median"),
            out["handshakes_per_minute_idle"].get("median", 0)),
        flush=True,
    )
    return out


def phase_hold(args, agents):
    """Counts, for --hold seconds, every (observer, member) pair seen down or
    suspect."""
    t0 = time.monotonic()
    since = time.time()
    downs, suspects = {}, {}
    while time.monotonic() - t0 < args.hold:
        for a in agents:
            st = a.states() or {}
            for n, s in st.items():
                seen = downs if s == "down" else suspects if s == "suspect" else None
                if seen is not None:
                    seen.setdefault(f"{a.name} saw {n}", round(time.monotonic() - t0, 1))
        time.sleep(1.0)
    # What the agents themselves logged in the window (the poll may miss a
    # short suspicion; the logs do not).
    logged = {}
    for message in ("member up", "member down", "member restarted"):
        logged[message] = sum(1 for _ in log_records(agents, message, since))
    print(f"hold: {args.hold} s, {len(downs)} (observer, member) pairs seen down, {len(suspects)} suspect; "
          f"logged: {logged}", flush=True)
    return {"seconds": args.hold, "down_pairs": len(downs), "suspect_pairs": len(suspects),
            "down_seen": downs, "suspect_seen": suspects, "logged": logged}


def log_records(agents, message, since):
    """Every log record with this message at or after `since` (wall clock)."""
    for a in agents:
        try:
            f = open(a.root / "logs" / f"{a.name}.log", "rb")
        except OSError:
            continue
        with f:
            for line in f:
                if message.encode() not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("message") != message:
                    continue
                t = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
                if t >= since:
                    yield rec


def log_times(agents, message, field, value, since):
    """name -> seconds after `since` (wall clock) of the first line in each
    agent's log with this message and `field` == `value`."""
    out = {}
    for a in agents:
        for rec in log_records([a], message, since):
            if rec.get(field) == value:
                out[a.name] = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp() - since
                break
    return out


def pairs_known(agents, since):
    """From every agent's log: when it last logged each other member up
    (`member up`, or `member restarted` for a new generation), in seconds
    after `since` (wall clock; earlier lines count as 0). Returns the time
    99 % of the (observer, member) pairs and every pair were known, or None
    if some pair never was."""
    names = {a.name for a in agents}
    times = []
    for a in agents:
        last = {}
        try:
            f = open(a.root / "logs" / f"{a.name}.log", "rb")
        except OSError:
            return None
        with f:
            for line in f:
                if b'"member up"' not in line and b'"member restarted"' not in line and b'"member down"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                member = rec.get("member")
                if member not in names:
                    continue
                t = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp() - since
                if rec.get("message") == "member down":
                    last.pop(member, None)
                else:
                    last[member] = max(t, 0.0)
        want = names - {a.name}
        if set(last) != want:
            return None
        times.extend(last.values())
    if not times:
        return None
    times.sort()
    return {"p99": times[min(len(times) - 1, int(0.99 * len(times)))], "all": times[-1]}


def wait_gently(agents, check, deadline):
    """Polls `check(agent)` on every agent still pending, one round a second
    (a tight loop over hundreds of agents would starve them of CPU), until
    all pass or `deadline` seconds pass."""
    pending = list(agents)
    t0 = time.monotonic()
    while pending and time.monotonic() - t0 < deadline:
        pending = [a for a in pending if not check(a)]
        if pending:
            time.sleep(1.0)
    return pending


def phase_catalog(args, agents, rng):
    """The time each agent merged the new entry, from its own log (the
    agents run with the catalog's debug lines on)."""
    owner = rng.choice(agents)
    sid = f"scale-{rng.randrange(1 << 30)}"
    since = time.time()
    status = owner.put(f"/v1/agent/services/{sid}", json.dumps({"name": "scale", "port": 9000}))
    if status != 200:
        raise SystemExit(f"registration on {owner.name} answered {status}")
    others = [a for a in agents if a is not owner]

    def listed(a):
        body = a.get("/v1/catalog")
        return body is not None and sid.encode() in body

    wait_gently(others, listed, 60)
    seen = log_times(others, "catalog entry merged", "node", owner.name, since)
    out = {"owner": owner.name, "reached": len(seen), "of": len(others), **summary(seen.values())}
    print(f"catalog: registration on {owner.name} merged by {len(seen)}/{len(others)}; median {out.get('median', 0):.2f} s, last {out.get('max', 0):.2f} s", flush=True)
    return out


def phase_config(args, agents, rng):
    """A route document applied at one agent; the time each other agent
    applied it, from its own log."""
    owner = rng.choice(agents)
    name = f"scale{rng.randrange(1 << 30)}"
    doc = owner.root / f"{name}.toml"
    doc.write_text(f'[[route]]\nname = "{name}"\ntimeout = "3s"\n')
    ops = owner.root / "operator"
    since = time.time()
    done = subprocess.run(
        [args.gossamer, "config", "apply", str(doc),
         "--operator-cert", str(ops / "scale.pem"), "--operator-key", str(ops / "scale.key"),
         "--admin", f"127.0.0.1:{owner.admin}"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"config apply on {owner.name} failed: {done.stdout}{done.stderr}")
    others = [a for a in agents if a is not owner]
    wait_gently(others, lambda a: a.get(f"/v1/config/route/{name}") is not None, 60)
    seen = log_times(others, "configuration document applied", "name", name, since)
    out = {"owner": owner.name, "reached": len(seen), "of": len(others), **summary(seen.values())}
    print(f"config: route document applied at {owner.name} active on {len(seen)}/{len(others)}; median {out.get('median', 0):.2f} s, last {out.get('max', 0):.2f} s", flush=True)
    return out


def phase_kill(args, agents, rng):
    """The time each observer declared the victim down, from its own log."""
    victim = rng.choice(agents[3:])
    observers = [a for a in agents if a is not victim]
    since = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()

    def sees_down(a):
        st = a.states()
        return st is not None and st.get(victim.name) == "down"

    wait_gently(observers, sees_down, 120)
    seen = log_times(observers, "member down", "member", victim.name, since)
    out = {"victim": victim.name, "detected_by": len(seen), "of": len(observers), **summary(seen.values())}
    print(f"kill: {victim.name} listed down by {len(seen)}/{len(observers)}; median {out.get('median', 0):.2f} s, last {out.get('max', 0):.2f} s", flush=True)
    agents.remove(victim)
    return out


def phase_starve(args, agents):
    live = [a for a in agents if a.alive()]
    if args.starve == "stop":
        for a in live:
            a.proc.send_signal(signal.SIGSTOP)
        time.sleep(args.starve_for)
        for a in live:
            a.proc.send_signal(signal.SIGCONT)
    else:
        hogs = []
        for _ in range(os.cpu_count() or 1):
            cmd = [sys.executable, "-c", f"import time\nt=time.time()+{args.starve_for}\nwhile time.time()<t: pass"]
            # Real-time priority starves every normal process (the kernel
            # still leaves them ~5 % of each core); fall back to nice.
            rt = ["chrt", "-f", "10"] + cmd
            try:
                hogs.append(subprocess.Popen(rt))
            except OSError:
                hogs.append(subprocess.Popen(cmd))
        for h in hogs:
            h.wait()
    print(f"starve: {args.starve} for {args.starve_for} s, done", flush=True)
    names = {a.name for a in live}
    back = all_alive(live, names, args.recover_deadline, "recovery")
    downs = 0
    for a in live:
        st = a.states() or {}
        downs += sum(1 for n, s in st.items() if n in names and s == "down")
    print(f"starve: every agent lists every other alive {back if back is None else round(back, 1)} s after the starvation ended", flush=True)
    return {"mode": args.starve, "seconds": args.starve_for, "recovered_after_s": back}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gossamer", required=True)
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--out", required=True)
    p.add_argument("--phases", default="form,idle,catalog,config,kill,starve")
    p.add_argument("--start-over", type=float, default=0.0, help="spread the starts over this many seconds")
    p.add_argument("--form-deadline", type=float, default=180)
    p.add_argument("--settle", type=float, default=30, help="pause before sampling footprint")
    p.add_argument("--idle", type=float, default=60, help="footprint sampling window")
    p.add_argument("--hold", type=float, default=600)
    p.add_argument("--starve", choices=["stop", "hog"], default="hog")
    p.add_argument("--starve-for", type=float, default=30)
    p.add_argument("--recover-deadline", type=float, default=180)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-level", default="info,gossamer_node::catalog=debug",
                   help="agent log filter (the catalog phase reads the catalog's debug lines)")
    p.add_argument("--agent-arg", action="append", default=[], help="extra agent argument (repeatable)")
    p.add_argument("--loopback-mtu", type=int, default=1452,
                   help="largest QUIC packet between the agents (GOSSAMER_LOOPBACK_MTU; default 1452, "
                        "as between hosts; 0 leaves the agent's own default, 16384 on loopback)")
    p.add_argument("--wrap", help=f"run agent {WRAPPED} under this command (a profiler, e.g. 'heaptrack -o /tmp/h')")
    p.add_argument("--keep", action="store_true", help="leave the agents running at the end")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gossamer-scale-"))
    (root / "logs").mkdir()
    rng = random.Random(args.seed)
    subprocess.run([args.gossamer, "ca", "init", "--dir", str(root / "ca")], check=True, capture_output=True)
    udp, tcp = free_ports(args.nodes, 2 * args.nodes)
    agents = [Agent(args, root, i + 1, udp[i], tcp[2 * i], tcp[2 * i + 1]) for i in range(args.nodes)]
    for a in agents:
        subprocess.run(
            [args.gossamer, "cert", "issue", "--ca-dir", str(root / "ca"), "--name", a.name, "--service", "scale",
             "--out", str(root / "certs")],
            check=True, capture_output=True,
        )
    if "config" in args.phases.split(","):
        subprocess.run(
            [args.gossamer, "cert", "issue", "--ca-dir", str(root / "ca"), "--operator", "scale", "--out", str(root / "operator")],
            check=True, capture_output=True,
        )
    result = {"nodes": args.nodes, "cores": os.cpu_count(), "logs": str(root / "logs")}
    print(f"{args.nodes} agents, logs in {root / 'logs'}", flush=True)
    try:
        for phase in args.phases.split(","):
            if phase == "form":
                result["form"] = phase_form(args, agents)
            elif phase == "idle":
                result["idle"] = phase_idle(args, agents)
            elif phase == "hold":
                result["hold"] = phase_hold(args, agents)
            elif phase == "catalog":
                result["catalog"] = phase_catalog(args, agents, rng)
            elif phase == "config":
                result["config"] = phase_config(args, agents, rng)
            elif phase == "kill":
                result["kill"] = phase_kill(args, agents, rng)
            elif phase == "starve":
                result["starve"] = phase_starve(args, agents)
            else:
                raise SystemExit(f"unknown phase {phase!r}")
            (out / "result.json").write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            # SIGTERM first, so that a profiler given by --wrap writes its
            # data; whatever has not exited after 30 s is killed.
            for a in agents:
                if a.alive():
                    a.proc.send_signal(signal.SIGCONT)
                    a.proc.terminate()
            if args.wrap:
                # A wrapper such as heaptrack's script does not pass the
                # signal on to the agent it started.
                subprocess.run(["pkill", "-TERM", "-f", str(root / "certs" / f"{WRAPPED}.pem")], check=False)
            deadline = time.monotonic() + 30
            for a in agents:
                if a.proc is None:
                    continue
                try:
                    a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    a.proc.kill()
                    a.proc.wait()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
