#!/usr/bin/env python3
"""The agent's code layout: which functions an agent runs, hottest first.

Starts the pair of agents bench.py measures (the 1,000-service catalog, a
TCP service, a gateway with an ingress route) with both agents under
valgrind's callgrind, and sends each kind of traffic bench.py sends
(HTTP/1.1, h2c, HTTPS through the gateway, TCP, large downloads) and the
admin API's reads. Then it applies bench.py's route and authz documents
and sends more, drives a second pair with access logs and tracing on, and
stops the agents. It writes the mangled names of the functions they ran,
one per line, in three tiers (what every agent ran; what the documents
added; what logs and tracing added), each by instructions spent in the
function itself, most first:

    python3 bench/layout.py --gossamer target/release/gossamer

(`--check` only reports how many of the file's names the binary has.)

node/build.rs gives that file to the linker (lld's --symbol-ordering-file)
for release builds, so the code an agent runs is laid out together and
fewer of the binary's pages are mapped into each agent. A name the binary
no longer has is skipped by the linker, so the file ages without breaking
a build; regenerate it when `--check` says it is stale (docs/benchmarks.md,
"The code an agent runs, laid out together").
"""

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


ORDER = Path(__file__).resolve().parent.parent / "node" / "layout" / "symbol-order.txt"


class Profiled(bench.Bench):
    """bench.Bench with the agents started under callgrind."""

    def start(self, name, argv, port, env=None):
        if not name.startswith("agent"):
            return super().start(name, argv, port, env)
        out = self.dir / f"callgrind.{name}.out"
        wrapped = ["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}"] + argv
        p = bench.Proc(name, wrapped, self.dir, env)
        self.procs.append(p)
        bench.wait_port(port, name, timeout=600)
        return p


def drive(b):
    """Every kind of traffic bench.py sends, a little of each."""
    p1 = b.paths["P1 gossamer"]
    url = f"http://127.0.0.1:{p1['port']}/1k"
    steps = [
        ["h2load", "--h1", "-n", "2000", "-c", "8", "-t", "1", "-H", ":authority: bench", url],
        ["h2load", "-n", "2000", "-c", "8", "-m", "10", "-t", "1", "-H", ":authority: bench", url],
        [b.args.oha, "-n", "500", "-c", "8", "--no-tui", "--insecure",
         f"https://127.0.0.1:{b.paths['G1 gossamer gateway']['port']}/1k"],
        [b.args.oha, "-n", "500", "-c", "8", "--no-tui", f"http://127.0.0.1:{b.paths['T1 gossamer tcp']['port']}/1k"],
        ["curl", "-sf", "-o", "/dev/null", "-H", "Host: bench", "-r", "0-67108863", f"http://127.0.0.1:{p1['port']}/big"],
        ["curl", "-sf", "-o", "/dev/null", "-r", "0-67108863", f"http://127.0.0.1:{b.paths['T1 gossamer tcp']['port']}/big"],
    ]
    for argv in steps:
        print("layout:", " ".join(argv[:3]), "...", file=sys.stderr, flush=True)
        subprocess.run(argv, check=True, capture_output=True, timeout=900)
    for admin in b.admin_ports:
        for path in ["/v1/agent", "/v1/members", "/v1/catalog", "/v1/config", "/metrics", "/v1/services/bench"]:
            bench.http_get(admin, path)


def drive_documents(b):
    """The configuration documents bench.py's P4 path measures: a route
    document's rules tried on every request, an authz document's at B."""
    here = Path(__file__).resolve().parent
    b.args.doc = [str(here / "route-20-rules.toml"), str(here / "authz-50-rules.toml")]
    b.docs_in_force(True)
    url = f"http://127.0.0.1:{b.paths['P1 gossamer']['port']}/1k"
    subprocess.run(["h2load", "--h1", "-n", "1000", "-c", "8", "-t", "1", "-H", ":authority: bench", url],
                   check=True, capture_output=True, timeout=900)
    b.docs_in_force(False)


def drive_observed(b, label):
    """HTTP/1.1 and h2c through a pair with access logs and tracing on."""
    url = f"http://127.0.0.1:{b.paths[label]['port']}/1k"
    for proto in (["--h1"], ["-m", "10"]):
        subprocess.run(["h2load", *proto, "-n", "1000", "-c", "8", "-t", "1", "-H", ":authority: bench", url],
                       check=True, capture_output=True, timeout=900)


def dump(p, out):
    """Has callgrind write what the agent ran so far (out.1) and start
    counting afresh."""
    for _ in range(60):
        subprocess.run(["callgrind_control", "-d", str(p.p.pid)], capture_output=True, timeout=120)
        time.sleep(1)
        if any("totals:" in f.read_text(errors="replace") for f in out.parent.glob(out.name + ".*")):
            return
    sys.exit(f"layout.py: callgrind did not dump {out}")


def stop_agents(b):
    """SIGTERM, then wait: callgrind writes its profile when the agent exits."""
    agents = [p for p in b.procs if p.name.startswith("agent")]
    for p in agents:
        p.p.send_signal(signal.SIGTERM)
    for p in agents:
        p.p.wait(600)
    for p in b.procs:
        if p not in agents:
            p.stop()


def functions(profile):
    """Mangled name -> instructions spent in the function itself, for the
    functions of the gossamer binary in one callgrind profile."""
    names, objects, cost = {}, {}, {}
    current = None
    ob = None
    skip_next = False
    binary = None
    for line in open(profile, errors="replace"):
        line = line.rstrip("\n")
        if skip_next:
            skip_next = False
            continue
        if line.startswith("cmd:"):
            binary = Path(line.split()[1]).name
            continue
        m = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            called, kind, ident, name = m.groups()
            table = objects if kind == "ob" else names
            if name is not None:
                # callgrind marks the recursion depth as name'2, name'3, ...
                table[ident] = re.sub(r"'\d+$", "", name)
            if kind == "ob" and not called:
                ob = table[ident]
            elif kind == "fn":
                if not called:
                    current = (ob, names[ident])
                cost.setdefault((ob, names[ident]), 0)
            continue
        if line.startswith("calls="):
            skip_next = True  # the next line is the call's inclusive cost
            continue
        if current and line[:1] in "0123456789+-*":
            parts = line.split()
            if len(parts) >= 2 and parts[-1].isdigit():
                cost[current] += int(parts[-1])
    return {name: c for (obj, name), c in cost.items() if obj and binary and Path(obj).name == binary}


def defined_symbols(binary):
    """The names the binary defines, as `nm` lists them."""
    nm = subprocess.run(["nm", "--defined-only", binary], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in nm.splitlines() if line.strip()}


def check(binary, order):
    """Reports how many of the ordered names the binary defines. The
    order's names carry hashes of the crates' build metadata: a new
    dependency version or compiler renames them, and the linker skips
    names it does not find, so a stale file lays the code out less well
    without failing a build. Returns an error text when under 90 % are
    found."""
    want = [n for n in Path(order).read_text().splitlines() if n]
    defined = defined_symbols(binary)
    found = sum(1 for n in want if n in defined)
    print(f"layout: {found:,} of the {len(want):,} ordered functions are in {binary}")
    if found < 0.9 * len(want):
        return f"layout: the order is stale; regenerate it: python3 bench/layout.py --gossamer {binary}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gossamer", required=True)
    ap.add_argument("--oha", default=str(Path(__file__).resolve().parent.parent / "target/bench-tools/bin/oha"))
    ap.add_argument("--out", default=str(ORDER), help=f"where the order goes (default {ORDER})")
    ap.add_argument("--check", action="store_true",
                    help="only report how many of the ordered functions --gossamer's binary has")
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.gossamer, args.out))
    for tool, package in [("valgrind", "valgrind"), ("h2load", "nghttp2-client"), ("nginx", "nginx-light")]:
        if not shutil.which(tool):
            sys.exit(f"layout.py: needs {tool} (apt-get install {package})")
    gossamer = str(Path(args.gossamer).resolve())
    b = Profiled(SimpleNamespace(gossamer=gossamer, oha=args.oha, tcp=True, gateway=True, crl=0, doc=[],
                                 observe=False, h2c=True, connections=8, startup_seconds=900))
    bench.PROXY_CORE = "0-1"
    try:
        b.pki()
        b.upstream()
        b.gossamer()
        drive(b)
        for p in b.procs:
            if p.name.startswith("agent"):
                dump(p, b.dir / f"callgrind.{p.name}.out")
        drive_documents(b)
        # The access log and tracing of bench.py's P5 path, on a pair of
        # their own.
        sink = b.span_sink()
        b.gossamer("P5", f'[access_log]\nenabled = true\npath = "{b.dir}/access-NODE.log"\nsample = 1.0\n\n'
                   f'[tracing]\nendpoint = "http://127.0.0.1:{sink}/v1/traces"\nsample = 0.01\n', sub="-observe")
        drive_observed(b, "P5")
        stop_agents(b)
    finally:
        for p in b.procs:
            if p.p.poll() is None:
                p.stop()
    # Three tiers, each hottest first: what every agent runs (starting,
    # gossip, each kind of traffic, the admin API), then what configuration
    # documents add (and stopping), then what access logs and tracing add.
    # An agent that uses neither maps none of the last two tiers' pages.
    tiers = [
        sorted(b.dir.glob("callgrind.agent-[ab].out.*")),
        sorted(b.dir.glob("callgrind.agent-[ab].out")),
        sorted(b.dir.glob("callgrind.agent-[ab]-observe.out*")),
    ]
    defined = defined_symbols(gossamer)
    order, placed = [], set()
    for profiles in tiers:
        total = {}
        for profile in profiles:
            for name, c in functions(profile).items():
                total[name] = total.get(name, 0) + c
        tier = sorted((n for n in total if n in defined and n not in placed), key=lambda n: (-total[n], n))
        print(f"layout.py: {len(tier)} functions in a tier of {len(profiles)} profiles", file=sys.stderr)
        order += tier
        placed.update(tier)
    if not order:
        sys.exit(f"layout.py: no profile with the binary's functions in {b.dir}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(n + "\n" for n in order))
    print(f"layout.py: {len(order)} functions ran, written to {args.out} (profiles in {b.dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
