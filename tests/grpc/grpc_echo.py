#!/usr/bin/env python3
"""A small gRPC echo server, conformance checker and load generator.

It uses the real grpcio package with generic handlers on raw bytes, so it
needs no generated protobuf code: every message is just the bytes sent.
Get an interpreter that has grpcio with `tests/grpc/python.sh`.

Usage:

  grpc_echo.py serve --port N [--host 127.0.0.1]
      Serve gossamer.test.Echo on HOST:N (N = 0 picks a free port), print
      one line `listening PORT`, and serve until SIGTERM or SIGINT (exit 0).

  grpc_echo.py check --target HOST:PORT [--authority NAME] [--long]
      Run the cases below against TARGET (a server, or a proxy in front of
      one), print one JSON line per case {"case", "ok", "detail"} and a
      closing line `N passed, M failed`. Exit 0 only when all passed.

  grpc_echo.py load --target HOST:PORT [--authority NAME] --seconds S
                    [--rate R] [--concurrency C]
      Send Unary calls (64-byte payloads, 2 s deadline) for S seconds at
      about R calls/s in total (default 50) from C threads (default 4).
      Print {"t", "ok", "failed"} after each whole second (calls that
      finished within that second) and a closing {"summary": true, "ok",
      "failed", "errors": {CODE: count}} over all calls, including those
      that finished after the last whole second. Stops by itself; SIGTERM
      or SIGINT stops it early, still printing the summary. Exit 0.

Methods of gossamer.test.Echo (requests and replies are ASCII where noted):

  Unary         returns the request unchanged
  ServerStream  request n; replies with n messages "0", "1", ... "n-1"
  Bidi          echoes each request message as it arrives
  Fail          request "CODE:message"; fails at once with that status
                (a trailers-only response)
  FailAfter     request "CODE:message"; streams "a", "b", then that status
  Sleep         request milliseconds; sleeps (returning early when the call
                is cancelled) and replies "slept", with trailing metadata
                x-deadline-ms = the time left to the call's deadline when it
                started on the server, or -1 when it had none
"""

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from concurrent import futures

import grpc

SERVICE = "gossamer.test.Echo"
MAX_MESSAGE = 16 * 1024 * 1024
SERVER_WORKERS = 16
POLL_SECONDS = 0.05
# grpcio reports "no deadline" as an enormous time remaining (about 9e18 s).
NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600
DEADLINE_METADATA = "x-deadline-ms"
DEADLINE_ROUNDING_MS = 500

LOAD_PAYLOAD = 64
LOAD_DEADLINE = 2.0


# ---------------------------------------------------------------- server


def parse_status(request):
    """Split b"CODE:message" into (grpc.StatusCode, message)."""
    name, _, message = request.decode("utf-8", "replace").partition(":")
    try:
        code = grpc.StatusCode[name.strip().upper()]
    except KeyError:
        return grpc.StatusCode.INVALID_ARGUMENT, f"unknown status code {name!r}"
    return code, message


def parse_count(request, context):
    """The request as a non-negative integer, or abort INVALID_ARGUMENT."""
    try:
        value = int(request.decode("ascii"))
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a count: {request[:40]!r}")


def handle_unary(request, _context):
    return request


def handle_server_stream(request, context):
    for i in range(parse_count(request, context)):
        yield str(i).encode("ascii")


def handle_bidi(requests, _context):
    for message in requests:
        yield message


def handle_fail(request, context):
    code, message = parse_status(request)
    context.abort(code, message)


def handle_fail_after(request, context):
    code, message = parse_status(request)
    yield b"a"
    yield b"b"
    context.set_code(code)
    context.set_details(message)


def remaining_ms(context):
    """Milliseconds to the call's deadline, or -1 when it has none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return -1
    return int(remaining * 1000)


def handle_sleep(request, context):
    context.set_trailing_metadata(((DEADLINE_METADATA, str(remaining_ms(context))),))
    end = time.monotonic() + parse_count(request, context) / 1000
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return b"slept"
        if not context.is_active():
            return b""  # cancelled or past its deadline: nobody reads this
        time.sleep(min(POLL_SECONDS, left))


def echo_handler():
    """The generic handler for SERVICE; messages stay raw bytes."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(handle_unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(handle_server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(handle_bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(handle_fail),
            "FailAfter": grpc.unary_stream_rpc_method_handler(handle_fail_after),
            "Sleep": grpc.unary_unary_rpc_method_handler(handle_sleep),
        },
    )


def host_port(host, port):
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def stop_event_on_signals():
    """An Event set by SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(args):
    stop = stop_event_on_signals()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS),
        handlers=(echo_handler(),),
        options=(
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # grpcio sets SO_REUSEPORT by default, so a second server on a
            # busy port would silently share it instead of failing.
            ("grpc.so_reuseport", 0),
        ),
    )
    address = host_port(args.host, args.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        port, reason = 0, error
    else:
        reason = "port in use or bad address"
    if not port:
        print(f"grpc_echo: cannot listen on {address}: {reason}", file=sys.stderr)
        return 1
    server.start()
    print(f"listening {port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait()
    return 0


# ---------------------------------------------------------------- client


def client_channel(target, authority):
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.enable_http_proxy", 0),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(target, options=options)


def method(name):
    return f"/{SERVICE}/{name}"


class CaseFailed(Exception):
    """A check case saw something other than what it expected."""


def expect(condition, detail):
    if not condition:
        raise CaseFailed(detail)


def describe_error(error):
    return f"{error.code().name}: {error.details()}"


def expect_status(error, code, details):
    expect(
        error.code() == code and error.details() == details,
        f"want {code.name}: {details!r}, got {error.code().name}: {error.details()!r}",
    )


def case_unary_small(channel):
    payload = b"hello, gossamer"
    reply = channel.unary_unary(method("Unary"))(payload, timeout=10)
    expect(reply == payload, f"got {reply[:64]!r}")
    return f"{len(reply)} bytes echoed"


def case_unary_large(channel):
    payload = os.urandom(5 * 1024 * 1024)
    reply = channel.unary_unary(method("Unary"))(payload, timeout=60)
    expect(len(reply) == len(payload), f"got {len(reply)} bytes, sent {len(payload)}")
    expect(reply == payload, "same length but different bytes")
    return f"{len(reply)} random bytes echoed"


def case_server_stream(channel):
    replies = list(channel.unary_stream(method("ServerStream"))(b"100", timeout=30))
    want = [str(i).encode() for i in range(100)]
    expect(replies == want, f"got {len(replies)} messages, first {replies[:3]!r}")
    return "100 messages in order"


def closable_requests(requests):
    """Yield from a queue until it yields None."""
    while True:
        item = requests.get()
        if item is None:
            return
        yield item


def case_bidi(channel):
    # Ping-pong: the next message goes out only after the last one came back,
    # so a proxy that buffers a stream's messages fails by the deadline.
    requests = queue.Queue()
    replies = channel.stream_stream(method("Bidi"))(closable_requests(requests), timeout=30)
    try:
        for i in range(50):
            message = f"message {i}".encode()
            requests.put(message)
            reply = next(replies, None)
            expect(reply == message, f"message {i}: sent {message!r}, got {reply!r}")
        requests.put(None)
        extra = list(replies)
        expect(not extra, f"{len(extra)} unexpected messages after the last one")
    finally:
        requests.put(None)
        replies.cancel()
    return "50 messages echoed one by one"


def case_trailers_only_error(channel):
    try:
        reply = channel.unary_unary(method("Fail"))(b"NOT_FOUND:no such thing", timeout=10)
    except grpc.RpcError as error:
        expect_status(error, grpc.StatusCode.NOT_FOUND, "no such thing")
        return describe_error(error)
    raise CaseFailed(f"call succeeded with {reply[:64]!r}")


def case_error_after_messages(channel):
    replies, status = [], None
    try:
        for reply in channel.unary_stream(method("FailAfter"))(b"RESOURCE_EXHAUSTED:quota", timeout=10):
            replies.append(reply)
    except grpc.RpcError as error:
        status = error
    seen = f"messages {replies!r}, then {describe_error(status) if status else 'OK'}"
    expect(replies == [b"a", b"b"], f"got {seen}")
    expect(status is not None, f"got {seen}")
    expect_status(status, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    return seen


def case_deadline_exceeded(channel):
    start = time.monotonic()
    try:
        reply = channel.unary_unary(method("Sleep"))(b"3000", timeout=0.5)
    except grpc.RpcError as error:
        elapsed = time.monotonic() - start
        expect(error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f"got {describe_error(error)}")
        expect(elapsed < 2.5, f"took {elapsed:.2f} s")
        return f"DEADLINE_EXCEEDED after {elapsed:.2f} s"
    raise CaseFailed(f"call succeeded with {reply[:64]!r}")


def trailing_value(call, key):
    for name, value in call.trailing_metadata() or ():
        if name == key:
            return value
    return None


def case_deadline_propagated(channel):
    reply, call = channel.unary_unary(method("Sleep")).with_call(b"100", timeout=25)
    expect(reply == b"slept", f"got {reply[:64]!r}")
    seen = trailing_value(call, DEADLINE_METADATA)
    expect(seen is not None, f"no {DEADLINE_METADATA} in trailers {call.trailing_metadata()!r}")
    # grpcio rounds grpc-timeout up on the wire (25 s arrives as about
    # 25.1 s), so allow a little above the 25 s the client set.
    expect(20000 <= int(seen) <= 25000 + DEADLINE_ROUNDING_MS, f"server saw {seen} ms left of 25000")
    return f"server saw {seen} ms left of 25000"


def case_long_call(channel):
    start = time.monotonic()
    reply = channel.unary_unary(method("Sleep"))(b"20000", timeout=25)
    expect(reply == b"slept", f"got {reply[:64]!r}")
    return f"slept 20 s, returned after {time.monotonic() - start:.1f} s"


CASES = (
    ("unary_small", case_unary_small),
    ("unary_5mb", case_unary_large),
    ("server_stream_100", case_server_stream),
    ("bidi_50", case_bidi),
    ("trailers_only_error", case_trailers_only_error),
    ("error_after_messages", case_error_after_messages),
    ("deadline_exceeded", case_deadline_exceeded),
    ("deadline_propagated", case_deadline_propagated),
)
LONG_CASES = (("long_call_20s", case_long_call),)


def run_case(name, case, channel):
    try:
        ok, detail = True, case(channel)
    except CaseFailed as failure:
        ok, detail = False, str(failure)
    except grpc.RpcError as error:
        ok, detail = False, describe_error(error)
    except Exception as error:  # a bug or surprise: report it, keep going
        ok, detail = False, f"{type(error).__name__}: {error}"
    print(json.dumps({"case": name, "ok": ok, "detail": detail}), flush=True)
    return ok


def check(args):
    cases = CASES + (LONG_CASES if args.long else ())
    with client_channel(args.target, args.authority) as channel:
        results = [run_case(name, case, channel) for name, case in cases]
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


# ---------------------------------------------------------------- load


class LoadStats:
    """Outcomes of load calls, per second since start and in total."""

    def __init__(self, start):
        self.start = start
        self.lock = threading.Lock()
        self.per_second = {}  # second index -> Counter(ok=, failed=)
        self.errors = Counter()
        self.totals = Counter()

    def record(self, error_code=None):
        second = int(time.monotonic() - self.start)
        outcome = "failed" if error_code else "ok"
        with self.lock:
            self.per_second.setdefault(second, Counter())[outcome] += 1
            self.totals[outcome] += 1
            if error_code:
                self.errors[error_code] += 1

    def second(self, index):
        with self.lock:
            counts = self.per_second.pop(index, Counter())
        return {"t": index + 1, "ok": counts["ok"], "failed": counts["failed"]}

    def summary(self):
        with self.lock:
            return {
                "summary": True,
                "ok": self.totals["ok"],
                "failed": self.totals["failed"],
                "errors": dict(self.errors),
            }


def load_call(unary):
    """One Unary call; returns None on success or an error name."""
    payload = os.urandom(LOAD_PAYLOAD)
    try:
        reply = unary(payload, timeout=LOAD_DEADLINE)
    except grpc.RpcError as error:
        return error.code().name
    except Exception as error:  # keep the worker alive whatever happens
        return type(error).__name__
    return None if reply == payload else "MISMATCH"


def load_worker(unary, stats, stop, end, interval, offset):
    """Call at one call per interval until end or stop, without bursts."""
    due = stats.start + offset
    while not stop.is_set():
        now = time.monotonic()
        if now >= end:
            return
        if due > now:
            if stop.wait(min(due - now, end - now)):
                return
            continue
        stats.record(load_call(unary))
        due = max(due + interval, time.monotonic())


def load(args):
    stop = stop_event_on_signals()
    start = time.monotonic()
    end = start + args.seconds
    stats = LoadStats(start)
    interval = args.concurrency / args.rate
    with client_channel(args.target, args.authority) as channel:
        unary = channel.unary_unary(method("Unary"))
        workers = [
            threading.Thread(
                target=load_worker,
                args=(unary, stats, stop, end, interval, i * interval / args.concurrency),
                daemon=True,
            )
            for i in range(args.concurrency)
        ]
        for worker in workers:
            worker.start()
        for index in range(int(args.seconds)):
            if stop.wait(max(0.0, start + index + 1 - time.monotonic())):
                break
            print(json.dumps(stats.second(index)), flush=True)
        stop.wait(max(0.0, end - time.monotonic()))  # a fractional last second
        stop.set()
        for worker in workers:
            worker.join(LOAD_DEADLINE + 1)
    print(json.dumps(stats.summary()), flush=True)
    return 0


# ---------------------------------------------------------------- main


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the echo server")
    serve_cmd.add_argument("--port", type=int, required=True)
    serve_cmd.add_argument("--host", default="127.0.0.1")

    check_cmd = commands.add_parser("check", help="run the conformance cases")
    check_cmd.add_argument("--target", required=True)
    check_cmd.add_argument("--authority")
    check_cmd.add_argument("--long", action="store_true", help="also run a 20 s call")

    load_cmd = commands.add_parser("load", help="send paced Unary calls")
    load_cmd.add_argument("--target", required=True)
    load_cmd.add_argument("--authority")
    load_cmd.add_argument("--seconds", type=positive(float), required=True)
    load_cmd.add_argument("--rate", type=positive(float), default=50.0)
    load_cmd.add_argument("--concurrency", type=positive(int), default=4)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = {"serve": serve, "check": check, "load": load}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
