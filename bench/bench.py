#!/usr/bin/env python3
"""Side-by-side data-plane benchmark (see docs/benchmarks.md).

Paths, all to the same 1 kB response from one nginx upstream:
  P0 direct     client -> upstream
  P1 gossamer   client -> agent A (outbound) -> QUIC mTLS -> agent B -> upstream,
                gossip running, synthetic catalog of 1,000 services / 2,000 instances
  P2 haproxy    client -> haproxy A -> TLS 1.3 mTLS -> haproxy B -> upstream
  P3 nginx      client -> nginx A -> TLS mTLS -> nginx B -> upstream
  P4 gossamer+docs  (with --doc FILE...) P1 again, on the same agents, with
                those configuration documents applied before and deleted after
  T1 gossamer tcp   (with --tcp) client -> agent A's upstream listener -> QUIC mTLS
                -> agent B -> upstream, the upstream registered as a TCP service
  T2 haproxy tcp    (with --tcp) client -> haproxy A (mode tcp) -> TLS 1.3 mTLS
                -> haproxy B (mode tcp) -> upstream
  G1 gossamer gateway  (with --gateway) HTTPS client -> agent A's gateway listener
                (TLS terminated, an ingress route) -> QUIC mTLS -> agent B -> upstream
  G2 haproxy gateway   (with --gateway) HTTPS client -> haproxy G (TLS terminated)
                -> TLS 1.3 mTLS -> haproxy B -> upstream
  H1 gossamer h2c     (with --h2c) h2load, HTTP/2 without TLS (prior knowledge),
                -> agent A's outbound listener -> QUIC mTLS -> agent B -> upstream
  H2 haproxy h2       (with --h2c) h2load, h2c -> haproxy A -> TLS 1.3 mTLS with
                ALPN h2 -> haproxy B -> upstream
  P5 gossamer+observe  (with --observe) P1 on a second pair of agents with access
                logs on for every request (to a file) and tracing at a 1 % sample
                (spans posted to a sink in this script), measured alongside P1

The load generator (oha) runs on core 0; proxies and the upstream on core 1,
one worker/thread each. Each repetition runs the paths in a shuffled order.
"""

import argparse
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The `defaults` section of every HAProxy in HTTP mode.
HTTP_DEFAULTS = """
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
"""

LOAD_CORE = "0"
PROXY_CORE = "1"
TICK = os.sysconf("SC_CLK_TCK")


# Seconds from an agent's launch until it purges freed memory lazily again
# (node/src/memory.rs: SETTLING 30 s, restored at the next 10 s tick), and
# a second to spare.
AGENT_SETTLING_S = 41


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port} within {timeout}s")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def all_pids(pid):
    """The process and its children (nginx master + worker)."""
    pids = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.extend(all_pids(int(child)))
    except OSError:
        pass
    return pids


class Proc:
    def __init__(self, name, argv, log_dir, env=None):
        self.name = name
        log = open(Path(log_dir) / f"{name}.log", "w")
        self.p = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE] + argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def pids(self):
        return all_pids(self.p.pid)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def http_get(port, path, host=None):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or '127.0.0.1'}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="gossamer-bench-"))
        # nginx workers run as an unprivileged user and must read the files.
        self.dir.chmod(0o755)
        self.procs = []
        self.paths = {}
        self.agents_started = []

    # ---- setup -------------------------------------------------------
    def pki(self):
        g = self.args.gossamer
        run([g, "ca", "init", "--dir", str(self.dir / "ca")])
        for name in ["ga", "gb", "proxy-a", "proxy-b"]:
            run([g, "cert", "issue", "--ca-dir", str(self.dir / "ca"), "--name", name,
                 "--service", "*", "--out", str(self.dir / "certs")])
        for name in ["proxy-a", "proxy-b"]:
            pem = (self.dir / f"certs/{name}.pem").read_text() + (self.dir / f"certs/{name}.key").read_text()
            (self.dir / f"certs/{name}.bundle").write_text(pem)
        if self.args.gateway:
            # The gateways' public certificate (P-256, like the mesh's).
            c = self.dir / "certs"
            run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", "2", "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
                 "-keyout", str(c / "public.key"), "-out", str(c / "public.pem")])
            (c / "public.bundle").write_text((c / "public.pem").read_text() + (c / "public.key").read_text())
        if self.args.crl:
            # A revocation list of this CA naming --crl serials no bench
            # certificate has, applied like the --doc documents.
            rng = random.Random(self.args.seed)
            serials = [f"{rng.getrandbits(120) | 1 << 119:030x}" for _ in range(self.args.crl)]
            argv = [g, "cert", "revoke", "--ca-dir", str(self.dir / "ca")]
            for serial in serials:
                argv += ["--serial", serial]
            run(argv)
            self.args.doc.append(str(self.dir / "ca/crl.pem"))

    def nginx_conf(self, name, body):
        prefix = self.dir / name
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {body}
}}
""")
        return ["nginx", "-p", str(prefix), "-c", str(conf)]

    def settle(self):
        """Waits until every agent is past its start's purge window. An
        agent returns each page it frees at once for its first 30-40 s
        (node/src/memory.rs: SETTLING, then the next CHECK_EVERY tick),
        which costs CPU under load; the path measured first would run
        inside that window (docs/benchmarks.md, "The start's purge window skews
        the first measurement").
        The run measures agents as they run from then on."""
        if self.agents_started:
            wait = max(self.agents_started) + AGENT_SETTLING_S - time.time()
            if wait > 0:
                print(f"waiting {wait:.0f} s for the agents' start to settle", file=sys.stderr, flush=True)
                time.sleep(wait)

    def start(self, name, argv, port, env=None):
        if name.startswith("agent-"):
            self.agents_started.append(time.time())
        p = Proc(name, argv, self.dir, env)
        self.procs.append(p)
        wait_port(port, name)
        return p

    def upstream(self):
        www = self.dir / "www"
        www.mkdir(mode=0o755)
        (www / "1k").write_bytes(b"x" * 1024)
        with open(www / "big", "wb") as f:
            f.truncate(1 << 30)
        self.up_port = free_port()
        argv = self.nginx_conf("upstream", f"server {{ listen 127.0.0.1:{self.up_port}; root {www}; sendfile on; }}")
        self.upstream_proc = self.start("upstream", argv, self.up_port)
        self.paths["P0 direct"] = {"port": self.up_port, "host": None, "procs": []}

    def span_sink(self):
        """An OTLP/HTTP endpoint that takes span batches and counts them."""
        import http.server

        counts = self.sink_counts = {"posts": 0, "bytes": 0}

        class Sink(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                counts["posts"] += 1
                counts["bytes"] += len(self.rfile.read(n))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1]

    def gossamer(self, label="P1 gossamer", extra="", sub=""):
        """A pair of agents (A: the client's sidecar, B: the server's) with
        a 1,000-service catalog. P4 is the same pair with --doc documents
        in force while it is measured. With `sub`, a second pair (its own
        ports and data dirs, `extra` added to both configs) serving only
        `label`."""
        g = self.args.gossamer
        ports = {k: free_port() for k in ["qa", "qb", "aa", "ab", "xa", "xb", "ta", "ga"]}
        tcp = self.args.tcp and not sub
        gateway = self.args.gateway and not sub
        for node, other in [("ga", "a"), ("gb", "b")]:
            blocks = []
            for i in range(1000):
                blocks.append(f'[[service]]\nid = "svc-{i:04}-{other}"\nname = "svc-{i:04}"\nport = {20000 + i}\n')
            if node == "gb":
                blocks.append(f'[[service]]\nid = "bench-b"\nname = "bench"\nport = {self.up_port}\n')
                if tcp:
                    blocks.append(f'[[service]]\nid = "bench-tcp-b"\nname = "bench-tcp"\nport = {self.up_port}\n'
                                  'protocol = "tcp"\n')
            elif tcp:
                blocks.append(f'[[upstream]]\nservice = "bench-tcp"\nlisten = "127.0.0.1:{ports["ta"]}"\n')
            if node == "ga" and gateway:
                c = self.dir / "certs"
                blocks.append(f'[[ingress.listener]]\nlisten = "127.0.0.1:{ports["ga"]}"\n'
                              f'tls = [{{ cert = "{c}/public.pem", key = "{c}/public.key" }}]\n')
            blocks.append(extra.replace("NODE", node))
            (self.dir / f"{node}{sub}.toml").write_text("\n".join(blocks))
        common = ["--ca", str(self.dir / "ca/ca.pem"), "--log-level", "warn", "--threads", "1"]
        b = self.start(f"agent-b{sub}", [g, "agent", "--name", "gb", "--bind", f"127.0.0.1:{ports['qb']}",
                                   "--admin", f"127.0.0.1:{ports['ab']}", "--proxy", f"127.0.0.1:{ports['xb']}",
                                   "--cert", str(self.dir / "certs/gb.pem"), "--key", str(self.dir / "certs/gb.key"),
                                   "--data-dir", str(self.dir / f"data-b{sub}"),
                                   "--config", str(self.dir / f"gb{sub}.toml")] + common,
                       ports["ab"])
        a = self.start(f"agent-a{sub}", [g, "agent", "--name", "ga", "--bind", f"127.0.0.1:{ports['qa']}",
                                   "--admin", f"127.0.0.1:{ports['aa']}", "--proxy", f"127.0.0.1:{ports['xa']}",
                                   "--seed", f"127.0.0.1:{ports['qb']}",
                                   "--cert", str(self.dir / "certs/ga.pem"), "--key", str(self.dir / "certs/ga.key"),
                                   "--data-dir", str(self.dir / f"data-a{sub}"),
                                   "--config", str(self.dir / f"ga{sub}.toml")] + common,
                       ports["aa"])
        # Longer under valgrind (bench/layout.py).
        slow = getattr(self.args, "startup_seconds", 60)
        deadline = time.time() + slow
        while time.time() < deadline:
            try:
                body = http_get(ports["aa"], "/v1/catalog").split(b"\r\n\r\n", 1)[1]
                services = json.loads(body)["services"]
                instances = sum(len(v) for v in services.values())
                if len(services) == 1001 + tcp and instances == 2001 + tcp:
                    break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        else:
            sys.exit("gossamer catalog did not reach 1,001 services on agent A")
        response = http_get(ports["xa"], "/1k", host="bench")
        if b"x" * 1024 not in response:
            sys.exit(f"gossamer path does not serve the 1 kB response: {response[:300]!r}")
        if sub:
            self.paths[label] = {"port": ports["xa"], "host": "bench", "procs": [a, b]}
            return
        self.admin_ports = [ports["aa"], ports["ab"]]
        if gateway:
            doc = self.dir / "ingress.toml"
            doc.write_text('[[ingress]]\nname = "bench"\n[[ingress.route]]\nhosts = ["*"]\nservice = "bench"\n')
            run([g, "config", "apply", str(doc), *self.operator(), "--admin", f"127.0.0.1:{ports['aa']}"])
            deadline = time.time() + slow / 2
            while time.time() < deadline:
                out = subprocess.run(["curl", "-sk", f"https://127.0.0.1:{ports['ga']}/1k"], capture_output=True).stdout
                if out == b"x" * 1024:
                    break
                time.sleep(0.2)
            else:
                sys.exit("the gossamer gateway does not serve the 1 kB response")
            self.paths["G1 gossamer gateway"] = {"port": ports["ga"], "host": None, "procs": [a, b], "https": True}
        self.paths["P1 gossamer"] = {"port": ports["xa"], "host": "bench", "procs": [a, b]}
        if tcp:
            if b"x" * 1024 not in http_get(ports["ta"], "/1k"):
                sys.exit("gossamer tcp path does not serve the 1 kB response")
            self.paths["T1 gossamer tcp"] = {"port": ports["ta"], "host": None, "procs": [a, b]}

    def operator(self):
        """The operator certificate and key that sign --doc documents."""
        ops = self.dir / "operators"
        if not (ops / "bench.pem").exists():
            run([self.args.gossamer, "cert", "issue", "--ca-dir", str(self.dir / "ca"), "--operator", "bench",
                 "--out", str(ops)])
        return ["--operator-cert", str(ops / "bench.pem"), "--operator-key", str(ops / "bench.key")]

    def docs_in_force(self, want):
        """Applies the --doc documents at agent A (want=True) or deletes
        them (False), then waits until both agents agree."""
        g, admin = self.args.gossamer, f"127.0.0.1:{self.admin_ports[0]}"
        if want:
            run([g, "config", "apply", *self.args.doc, *self.operator(), "--admin", admin])
        else:
            listed = json.loads(subprocess.run([g, "config", "list", "--json", "--admin", admin],
                                               check=True, capture_output=True, text=True).stdout)["documents"]
            for d in listed:
                if d["status"] == "active" and d["kind"] != "ingress":
                    run([g, "config", "delete", d["kind"], d["name"], *self.operator(), "--admin", admin])
        deadline = time.time() + 30
        while time.time() < deadline:
            lists = [http_get(port, "/v1/config").split(b"\r\n\r\n", 1)[1] for port in self.admin_ports]
            active = [sum(1 for d in json.loads(b)["documents"] if d["status"] == "active" and d["kind"] != "ingress")
                      for b in lists]
            if (all(n > 0 for n in active) and len(set(active)) == 1) if want else not any(active):
                response = http_get(self.paths["P1 gossamer"]["port"], "/1k", host="bench")
                if b"x" * 1024 not in response:
                    sys.exit(f"with the documents in force, the gossamer path does not serve: {response[:300]!r}")
                # Measure the steady state, not the agents storing, spreading
                # and compiling the change.
                time.sleep(3)
                return
            time.sleep(0.2)
        sys.exit(f"documents not {'in force' if want else 'deleted'} on both agents: {active}")

    def haproxy_pair(self, name, alpn, front=""):
        """An HAProxy pair: A (client side, plain on `front`'s bind) calls B
        over TLS 1.3 with client certificates and ALPN `alpn`; B calls the
        upstream with HTTP/1.1. Returns (A, B, A's port, B's port)."""
        pa, pb = free_port(), free_port()
        c = self.dir / "certs"
        common = HTTP_DEFAULTS
        (self.dir / f"{name}-b.cfg").write_text(f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
{common}
frontend fb
    bind 127.0.0.1:{pb} ssl crt {c}/proxy-b.bundle ca-file {self.dir}/ca/ca.pem verify required alpn {alpn}
    default_backend up
backend up
    server u 127.0.0.1:{self.up_port}
""")
        (self.dir / f"{name}-a.cfg").write_text(f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-server-options ssl-min-ver TLSv1.3
{common}
frontend fa
    bind 127.0.0.1:{pa}{front}
    default_backend b
backend b
    server b 127.0.0.1:{pb} ssl crt {c}/proxy-a.bundle ca-file {self.dir}/ca/ca.pem verify required verifyhost proxy-b sni str(proxy-b) alpn {alpn}
""")
        b = self.start(f"{name}-b", ["haproxy", "-db", "-f", str(self.dir / f"{name}-b.cfg")], pb)
        a = self.start(f"{name}-a", ["haproxy", "-db", "-f", str(self.dir / f"{name}-a.cfg")], pa)
        return a, b, pa, pb

    def haproxy(self):
        a, b, pa, pb = self.haproxy_pair("haproxy", "http/1.1")
        c = self.dir / "certs"
        common = HTTP_DEFAULTS
        if b"x" * 1024 not in http_get(pa, "/1k"):
            sys.exit("haproxy path does not serve the 1 kB response")
        self.paths["P2 haproxy"] = {"port": pa, "host": None, "procs": [a, b]}
        if self.args.gateway:
            pg = free_port()
            (self.dir / "haproxy-g.cfg").write_text(f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-server-options ssl-min-ver TLSv1.3
    ssl-default-bind-options ssl-min-ver TLSv1.2
{common}
frontend fg
    bind 127.0.0.1:{pg} ssl crt {c}/public.bundle alpn h2,http/1.1
    default_backend b
backend b
    server b 127.0.0.1:{pb} ssl crt {c}/proxy-a.bundle ca-file {self.dir}/ca/ca.pem verify required verifyhost proxy-b sni str(proxy-b) alpn http/1.1
""")
            gw = self.start("haproxy-g", ["haproxy", "-db", "-f", str(self.dir / "haproxy-g.cfg")], pg)
            out = subprocess.run(["curl", "-sk", f"https://127.0.0.1:{pg}/1k"], capture_output=True).stdout
            if out != b"x" * 1024:
                sys.exit("the haproxy gateway does not serve the 1 kB response")
            self.paths["G2 haproxy gateway"] = {"port": pg, "host": None, "procs": [gw, b], "https": True}

    def haproxy_h2(self):
        """The HAProxy pair speaking HTTP/2 on both hops: h2c from the
        client, TLS 1.3 with client certificates and ALPN h2 between A and
        B; B calls the upstream with HTTP/1.1 like every other path."""
        a, b, pa, _ = self.haproxy_pair("haproxy-h2", "h2", " proto h2")
        self.paths["H2 haproxy h2"] = {"port": pa, "host": None, "procs": [a, b], "h2": True}
        self.h2load_check("H2 haproxy h2")

    def h2load(self, path, seconds):
        """h2load against a path for `seconds`: (requests done, 2xx answers,
        failed, req/s). h2load's req/s counts successful requests only; a
        failed one is a stream that was reset or never answered."""
        argv = ["taskset", "-c", LOAD_CORE, "h2load", "-D", str(seconds), "-c", str(self.args.connections),
                "-m", "10", "-t", "1", f"http://127.0.0.1:{path['port']}/1k"]
        if path["host"]:
            argv[-1:-1] = ["-H", f":authority: {path['host']}"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
        status = re.search(r"status codes: (\d+) 2xx", out)
        ok = int(status.group(1)) if status else int(m.group(3))
        return int(m.group(2)), ok, int(m.group(4)), rps

    def h2load_check(self, name):
        done, ok, failed, _ = self.h2load(self.paths[name], 1)
        if ok == 0 or ok < done:
            sys.exit(f"{name}: h2load got {ok} 2xx of {done} requests ({failed} failed)")

    def measure_h2(self, path):
        """Saturation with h2load (64 connections, 10 streams each): req/s
        and CPU per 1,000 requests of each proxy."""
        procs = path["procs"]
        cpu0 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
        done, ok, failed, rps = self.h2load(path, self.args.saturation_seconds)
        cpu1 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
        return {"saturation_rps": rps, "saturation_errors": failed, "h2": True,
                "cpu_s_per_1000_req": [(b - a) / (ok / 1000) if ok else None for a, b in zip(cpu0, cpu1)]}

    def haproxy_tcp(self):
        """The HAProxy pair in TCP mode: TLS 1.3 with client certificates
        between A and B, bytes on both sides (one TLS connection per client
        connection)."""
        pa, pb = free_port(), free_port()
        c = self.dir / "certs"
        common = """
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""
        (self.dir / "haproxy-tcp-b.cfg").write_text(f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
{common}
frontend fb
    bind 127.0.0.1:{pb} ssl crt {c}/proxy-b.bundle ca-file {self.dir}/ca/ca.pem verify required
    default_backend up
backend up
    server u 127.0.0.1:{self.up_port}
""")
        (self.dir / "haproxy-tcp-a.cfg").write_text(f"""
global
    nbthread 1
    maxconn 8000
    ssl-default-server-options ssl-min-ver TLSv1.3
{common}
frontend fa
    bind 127.0.0.1:{pa}
    default_backend b
backend b
    server b 127.0.0.1:{pb} ssl crt {c}/proxy-a.bundle ca-file {self.dir}/ca/ca.pem verify required verifyhost proxy-b sni str(proxy-b)
""")
        b = self.start("haproxy-tcp-b", ["haproxy", "-db", "-f", str(self.dir / "haproxy-tcp-b.cfg")], pb)
        a = self.start("haproxy-tcp-a", ["haproxy", "-db", "-f", str(self.dir / "haproxy-tcp-a.cfg")], pa)
        if b"x" * 1024 not in http_get(pa, "/1k"):
            sys.exit("haproxy tcp path does not serve the 1 kB response")
        self.paths["T2 haproxy tcp"] = {"port": pa, "host": None, "procs": [a, b]}

    def nginx(self):
        pa, pb = free_port(), free_port()
        c = self.dir / "certs"
        b = self.start("nginx-b", self.nginx_conf("nginx-b", f"""
    upstream up {{ server 127.0.0.1:{self.up_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{pb} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {c}/proxy-b.pem;
        ssl_certificate_key {c}/proxy-b.key;
        ssl_client_certificate {self.dir}/ca/ca.pem;
        ssl_verify_client on;
        location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}"""), pb)
        a = self.start("nginx-a", self.nginx_conf("nginx-a", f"""
    upstream b {{ server 127.0.0.1:{pb}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{pa};
        location / {{
            proxy_pass https://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {c}/proxy-a.pem;
            proxy_ssl_certificate_key {c}/proxy-a.key;
            proxy_ssl_trusted_certificate {self.dir}/ca/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name proxy-b;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}"""), pa)
        if b"x" * 1024 not in http_get(pa, "/1k"):
            sys.exit("nginx path does not serve the 1 kB response")
        self.paths["P3 nginx"] = {"port": pa, "host": None, "procs": [a, b]}

    # ---- measurement -------------------------------------------------
    def oha(self, path, extra, seconds):
        scheme = "https" if path.get("https") else "http"
        url = f"{scheme}://127.0.0.1:{path['port']}/1k"
        if path.get("https"):
            extra = extra + ["--insecure"]
        argv = ["taskset", "-c", LOAD_CORE, self.args.oha, "--no-tui", "--output-format", "json",
                "-z", f"{seconds}s"] + extra + [url]
        if path["host"]:
            argv[4:4] = ["-H", f"Host: {path['host']}"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        return json.loads(out)

    def proxy_pids(self, path):
        return [pid for p in path["procs"] for pid in p.pids()]

    def measure(self, name):
        path = self.paths[name]
        if path.get("h2"):
            return self.measure_h2(path)
        if path.get("docs"):
            self.docs_in_force(True)
            try:
                return self.measure_now(path)
            finally:
                self.docs_in_force(False)
        return self.measure_now(path)

    def measure_now(self, path):
        procs = path["procs"]
        result = {"idle_rss_kib": [sum(rss_kib(pid) for pid in p.pids()) for p in procs]}
        # Saturation, closed loop, sampling RSS while it runs.
        peak = [0] * len(procs)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for i, p in enumerate(procs):
                    peak[i] = max(peak[i], sum(rss_kib(pid) for pid in p.pids()))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        cpu0 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
        sat = self.oha(path, ["-c", str(self.args.connections)], self.args.saturation_seconds)
        cpu1 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
        stop.set()
        sampler.join()
        ok = sat["statusCodeDistribution"].get("200", 0)
        result["saturation_rps"] = sat["summary"]["requestsPerSec"]
        result["saturation_errors"] = sum(sat.get("errorDistribution", {}).values())
        result["load_rss_kib"] = peak
        result["cpu_s_per_1000_req"] = [(b - a) / (ok / 1000) if ok else None for a, b in zip(cpu0, cpu1)]
        result["rates"] = {}
        for rate in self.args.rates:
            cpu0 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
            t0 = time.time()
            r = self.oha(path, ["-q", str(rate), "-c", "32", "--latency-correction"], self.args.latency_seconds)
            elapsed = time.time() - t0
            cpu1 = [sum(cpu_seconds(pid) for pid in p.pids()) for p in procs]
            lat = r["latencyPercentiles"]
            result["rates"][str(rate)] = {
                "p50_ms": lat["p50"] * 1000,
                "p90_ms": lat["p90"] * 1000,
                "p99_ms": lat["p99"] * 1000,
                "achieved_rps": r["summary"]["requestsPerSec"],
                "vcpu": [(b - a) / elapsed for a, b in zip(cpu0, cpu1)],
            }
        return result

    def transfer(self, name, runs=3):
        """The median of `runs` downloads of the 1 GiB file through `name`.
        The file is sparse and read once before any path is timed, so every
        path reads it from the page cache (a cold first read runs at about
        a seventh of the warm speed and made direct look slow)."""
        path = self.paths[name]
        argv = ["taskset", "-c", LOAD_CORE, "curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
                f"http://127.0.0.1:{path['port']}/big"]
        if path["host"]:
            argv[4:4] = ["-H", f"Host: {path['host']}"]
        samples = []
        for _ in range(runs):
            out = run(argv).stdout.split()
            samples.append({"seconds": float(out[0]), "bytes": int(out[1])})
        samples.sort(key=lambda t: t["seconds"])
        return dict(samples[len(samples) // 2], runs=[t["seconds"] for t in samples])

    def go(self):
        names = ["P0 direct", "P1 gossamer", "P2 haproxy", "P3 nginx"]
        if self.args.doc or self.args.crl:
            names.append("P4 gossamer+docs")
        if self.args.tcp:
            names += ["T1 gossamer tcp", "T2 haproxy tcp"]
        if self.args.gateway:
            names += ["G1 gossamer gateway", "G2 haproxy gateway"]
        if self.args.observe:
            names.append("P5 gossamer+observe")
        if self.args.h2c:
            names += ["H1 gossamer h2c", "H2 haproxy h2"]
        if self.args.only:
            names = [n for n in names if n == "P0 direct" or any(n.startswith(o) for o in self.args.only)]
        results = {name: [] for name in names}
        transfers = {}
        try:
            self.pki()
            self.upstream()
            self.gossamer()
            if self.args.doc or self.args.crl:
                self.paths["P4 gossamer+docs"] = dict(self.paths["P1 gossamer"], docs=True)
            if self.args.observe:
                sink = self.span_sink()
                extra = (f'[access_log]\nenabled = true\npath = "{self.dir}/access-NODE.log"\nsample = 1.0\n\n'
                         f'[tracing]\nendpoint = "http://127.0.0.1:{sink}/v1/traces"\nsample = 0.01\n')
                self.gossamer("P5 gossamer+observe", extra, sub="-observe")
            self.haproxy()
            if self.args.h2c:
                self.paths["H1 gossamer h2c"] = dict(self.paths["P1 gossamer"], h2=True)
                self.h2load_check("H1 gossamer h2c")
                self.haproxy_h2()
            if self.args.tcp:
                self.haproxy_tcp()
            self.nginx()
            self.settle()
            rng = random.Random(self.args.seed)
            for rep in range(0 if self.args.transfer_only else self.args.repetitions):
                order = list(results)
                rng.shuffle(order)
                for name in order:
                    print(f"[rep {rep + 1}/{self.args.repetitions}] {name}", file=sys.stderr, flush=True)
                    results[name].append(self.measure(name))
            if self.args.observe:
                logged = sum(1 for _ in open(self.dir / "access-ga.log", "rb"))
                print(f"P5: {logged} access-log lines at agent A; span sink got {self.sink_counts['posts']} "
                      f"batches, {self.sink_counts['bytes']} bytes", file=sys.stderr)
            self.transfer("P0 direct", runs=1)  # warms the page cache
            bulk = ["P0 direct", "P1 gossamer", "P2 haproxy", "P3 nginx"]
            if self.args.tcp:
                bulk += ["T1 gossamer tcp", "T2 haproxy tcp"]
            for name in [n for n in bulk if n in self.paths]:
                transfers[name] = self.transfer(name)
                print(f"1 GiB via {name}: {transfers[name]}", file=sys.stderr)
        finally:
            for p in reversed(self.procs):
                p.stop()
        return {"machine": machine(), "args": {k: v for k, v in vars(self.args).items() if k not in ("gossamer", "oha", "out")},
                "runs": results, "transfer_1gib": transfers}


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    mem = next((l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": os.uname().release,
            "haproxy": run(["haproxy", "-v"]).stdout.splitlines()[0],
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def summarize(data, out):
    runs = data["runs"]
    direct = runs["P0 direct"]
    rates = [str(r) for r in data["args"]["rates"]]
    lines = ["| path | saturation req/s | vs direct | " +
             " | ".join(f"added p50/p90/p99 ms @ {r}/s" for r in rates) +
             " | CPU s per 1,000 req (A, B) | vCPU @ 1,000/s (A, B) | RSS idle MB (A, B) | RSS load MB (A, B) |",
             "|---" * (7 + len(rates)) + "|"]
    if not direct:  # --transfer-only
        lines, runs = [], {}
    else:
        d_rps = med([r["saturation_rps"] for r in direct])
    h2 = {name: rs for name, rs in runs.items() if rs and rs[0].get("h2")}
    runs = {name: rs for name, rs in runs.items() if name not in h2}
    for name, rs in runs.items():
        rps = med([r["saturation_rps"] for r in rs])
        cells = [name, f"{rps:,.0f}", f"{rps / d_rps:.2f}"]
        for rate in rates:
            added = []
            for q in ["p50_ms", "p90_ms", "p99_ms"]:
                if name == "P0 direct":
                    added.append(f"{med([r['rates'][rate][q] for r in rs]):.3f} (abs)")
                else:
                    deltas = [r["rates"][rate][q] - d["rates"][rate][q] for r, d in zip(rs, direct)]
                    added.append(f"{med(deltas):+.3f}")
            cells.append(" / ".join(added))
        n = len(rs[0]["idle_rss_kib"])
        if n:
            cpu = [med([r["cpu_s_per_1000_req"][i] for r in rs]) for i in range(n)]
            vcpu = [med([r["rates"].get("1000", {}).get("vcpu", [None] * n)[i] for r in rs]) for i in range(n)]
            idle = [med([r["idle_rss_kib"][i] for r in rs]) / 1024 for i in range(n)]
            load = [med([r["load_rss_kib"][i] for r in rs]) / 1024 for i in range(n)]
            cells += [", ".join(f"{c:.3f}" for c in cpu), ", ".join(f"{c:.3f}" for c in vcpu),
                      ", ".join(f"{c:.1f}" for c in idle), ", ".join(f"{c:.1f}" for c in load)]
        else:
            cells += ["-", "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if h2:
        base = med([r["saturation_rps"] for r in h2.get("H2 haproxy h2", [])] or [0])
        lines += ["", "| h2c path (h2load, 64 connections × 10 streams) | saturation req/s | vs HAProxy h2 | "
                  "CPU s per 1,000 req (A, B) | failed |", "|---|---|---|---|---|"]
        for name, rs in h2.items():
            rps = med([r["saturation_rps"] for r in rs])
            cpu = [med([r["cpu_s_per_1000_req"][i] for r in rs]) for i in range(len(rs[0]["cpu_s_per_1000_req"]))]
            ratio = f"{rps / base:.2f}" if base else "-"
            lines.append(f"| {name} | {rps:,.0f} | {ratio} | {', '.join(f'{c:.3f}' for c in cpu)} | "
                         f"{sum(r['saturation_errors'] for r in rs)} |")
    for name, t in data["transfer_1gib"].items():
        ratio = ""
        bulk_direct = data["transfer_1gib"].get("P0 direct")
        if bulk_direct and name != "P0 direct":
            ratio = f", {bulk_direct['seconds'] / t['seconds']:.2f}x direct"
        lines.append(f"\n1 GiB transfer via {name}: {t['seconds']:.2f} s ({t['bytes'] / t['seconds'] / 1e6:,.0f} MB/s{ratio}),"
                     f" median of {len(t.get('runs', [1]))} after a warm-up read")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    if not runs:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [n for n in runs if n != "P0 direct"]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [med([r["rates"][rate]["p99_ms"] - d["rates"][rate]["p99_ms"] for r, d in zip(runs[name], direct)])
                  for rate in rates]
            ax1.bar([j + i * width for j in range(len(rates))], ys, width, label=name)
        ax1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rates))], [f"{r}/s" for r in rates])
        ax1.set_ylabel("added p99 latency (ms)")
        ax1.set_title("Added p99 latency vs direct (lower is better)")
        ax1.legend()
        all_names = list(runs)
        ax2.bar(all_names, [med([r["saturation_rps"] for r in runs[n]]) for n in all_names])
        ax2.tick_params(axis="x", labelrotation=30)
        for label in ax2.get_xticklabels():
            label.set_horizontalalignment("right")
        ax2.set_ylabel("requests/s")
        ax2.set_title("Saturation throughput (higher is better)")
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=100)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gossamer", required=True)
    ap.add_argument("--oha", help="oha binary (needed unless --transfer-only)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--rates", type=int, nargs="+", default=[200, 1000, 2000])
    ap.add_argument("--saturation-seconds", type=int, default=10)
    ap.add_argument("--latency-seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="1 repetition, 5 s phases")
    ap.add_argument("--tcp", action="store_true",
                    help="also measure T1 (a TCP service through an upstream listener) and T2 (HAProxy's TCP mode as an mTLS pair)")
    ap.add_argument("--crl", type=int, default=0, metavar="N",
                    help="also measure P4 with a revocation list of N serials (of no bench certificate) in force")
    ap.add_argument("--doc", action="append", default=[],
                    help="also measure P4: the Gossamer pair with this signed configuration document in force "
                    "(repeatable; e.g. bench/route-20-rules.toml bench/authz-50-rules.toml), alternating with the others")
    ap.add_argument("--gateway", action="store_true",
                    help="also measure G1 (HTTPS into a Gossamer gateway, then the mesh) and G2 (HTTPS into "
                    "HAProxy terminating TLS, then its mTLS pair)")
    ap.add_argument("--h2c", action="store_true",
                    help="also measure HTTP/2: h2load through Gossamer (h2c to agent A) and through HAProxy "
                    "speaking h2 on both hops (needs h2load, Debian's nghttp2-client)")
    ap.add_argument("--observe", action="store_true",
                    help="also measure P5: a second Gossamer pair with access logs on for every request "
                    "and tracing at a 1 %% sample, alongside P1")
    ap.add_argument("--only", nargs="+", metavar="PREFIX",
                    help="measure only the paths whose names start with these (P0 always), e.g. --only P1 P5")
    ap.add_argument("--transfer-only", action="store_true",
                    help="only the 1 GiB transfers (no load phases)")
    args = ap.parse_args()
    if not args.oha and not args.transfer_only:
        ap.error("--oha is required (unless --transfer-only)")
    if args.quick:
        args.repetitions, args.saturation_seconds, args.latency_seconds = 1, 5, 5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Bench(args).go()
    (out / "results.json").write_text(json.dumps(data, indent=2))
    summarize(data, out)


if __name__ == "__main__":
    main()
