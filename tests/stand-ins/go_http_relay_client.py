#!/usr/bin/env python3
"""A stand-in for Google Cloud Robotics' Go `http-relay-client` (protocol v1alpha1).

The Go toolchain the real client needs cannot be installed here, so this program does on
the wire what `src/go/cmd/http-relay-client` does, as described in
`shared/reference/go-relay-behaviour.md` (sections 3, 4 and 6):

- workers (`--num_pending_requests`) long-poll `GET <prefix>/server/request?server=NAME`;
  200 carries one protobuf `HttpRequest`, 408 means "poll again at once", 403 exits with
  status 1, anything else is retried with exponential backoff (100 ms, x1.5, at most 10 s,
  no jitter);
- each request is replayed against the backend (method, `http://invalid` URL rewritten
  onto `--backend_address`, every relayed header, `Host` from the message);
- the backend's body is read in `--block_size` blocks and posted as `HttpResponse`
  messages to `<prefix>/server/response`: when more than `--max_chunk_size` bytes are
  buffered, or at each 100 ms tick when bytes are pending or the status is not sent yet,
  an empty keep-alive after 31 idle ticks, and `eof` with `backend_duration_ms` at the
  end. Only the first message carries `status_code` (proto2 presence). POSTs are retried
  (1 s, x2, at most 10 s, 10 retries); 400 is permanent: the backend request is dropped;
- a 101 answer starts the upstream loop: `POST <prefix>/server/requeststream?id=ID` with
  an empty body, each 200 body written to the backend connection; 410, any other status or
  an error closes the backend connection.

The protobuf encoding is written out here by hand (proto2 wire format), independently of
the relay's Rust code, so the two implementations check each other.

Differences from the Go binary, none visible to the relay: the relay token comes from
`--relay_token` instead of Application Default Credentials; backends are spoken to over
HTTP/1.1 with Python's http.client (response trailers are not read); there is no tracing.
"""

import argparse
import http.client
import os
import queue
import socket
import ssl
import sys
import threading
import time

URL_ORIGIN = "http://invalid"
REQUEST_TYPE = "application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse"


def log(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------- proto2 wire format


def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire_type):
    return varint(field << 3 | wire_type)


def length_delimited(field, data):
    return key(field, 2) + varint(len(data)) + data


def encode_header(name, value):
    return length_delimited(1, name) + length_delimited(2, value)


def encode_response(rid, status=None, headers=(), body=b"", eof=None, trailers=(), duration_ms=None):
    """An HttpResponse, fields in number order as Go's proto.Marshal writes them."""
    out = b""
    if status is not None:
        out += key(1, 0) + varint(status)
    for name, value in headers:
        out += length_delimited(2, encode_header(name, value))
    if body:
        out += length_delimited(3, bytes(body))
    out += length_delimited(4, rid.encode())
    if eof is not None:
        out += key(5, 0) + varint(1 if eof else 0)
    for name, value in trailers:
        out += length_delimited(6, encode_header(name, value))
    if duration_ms is not None:
        out += key(7, 0) + varint(duration_ms)
    return out


def fields(buf):
    """(field number, value) pairs of a message; varints as ints, the rest as bytes."""
    i = 0
    while i < len(buf):
        tag, i = read_varint(buf, i)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, i = read_varint(buf, i)
        elif wire_type == 2:
            n, i = read_varint(buf, i)
            value = buf[i:i + n]
            if len(value) != n:
                raise ValueError("truncated field")
            i += n
        elif wire_type == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire_type == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire_type}")
        yield field, value


def read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def decode_request(buf):
    req = {"id": "", "method": "GET", "url": URL_ORIGIN + "/", "headers": [], "body": b"", "host": None}
    for field, value in fields(buf):
        if field == 1:
            req["id"] = value.decode()
        elif field == 2:
            req["method"] = value.decode()
        elif field == 3:
            req["url"] = value.decode()
        elif field == 4:
            h = dict(fields(value))
            req["headers"].append((h.get(1, b""), h.get(2, b"")))
        elif field == 5:
            req["body"] = bytes(value)
        elif field == 6:
            req["host"] = value.decode()
    return req


# ---------------------------------------------------------------- calls to the relay


class Backoff:
    """cenkalti/backoff's exponential policy without jitter."""

    def __init__(self, initial, factor, max_interval, max_retries=None):
        self.initial, self.factor, self.max_interval = initial, factor, max_interval
        self.max_retries = max_retries
        self.reset()

    def reset(self):
        self.interval, self.retries = self.initial, 0

    def next(self):
        if self.max_retries is not None and self.retries >= self.max_retries:
            return None
        wait = self.interval
        self.interval = min(self.interval * self.factor, self.max_interval)
        self.retries += 1
        return wait


class Relay:
    def __init__(self, args):
        self.args = args
        self.local = threading.local()

    def connection(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            host = self.args.relay_address
            if self.args.relay_scheme == "https":
                ctx = ssl.create_default_context()
                conn = http.client.HTTPSConnection(host, timeout=60, context=ctx)
            else:
                conn = http.client.HTTPConnection(host, timeout=60)
            self.local.conn = conn
        return conn

    def call(self, method, path, body=None, content_type=None):
        """One relay call on this thread's keep-alive connection (60 s deadline)."""
        headers = {"User-Agent": "Go-http-client/1.1"}
        if not self.args.disable_auth_for_remote:
            headers["Authorization"] = "Bearer " + self.args.relay_token
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            conn = self.connection()
            try:
                conn.request(method, self.args.relay_prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed meanwhile: Go's transport
                # retries such a request on a fresh connection once.
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
            except Exception:
                conn.close()
                self.local.conn = None
                raise


# ---------------------------------------------------------------- serving one request


class Stopped(Exception):
    """The relay answered 400: the request is gone (the user left)."""


def post_message(relay, message):
    backoff = Backoff(1.0, 2.0, 10.0, max_retries=10)
    while True:
        try:
            status, body = relay.call("POST", "/server/response", message, REQUEST_TYPE)
        except OSError as e:
            status, body = None, str(e).encode()
        if status == 200:
            return
        if status == 400:
            log("response POST got 400:", body.decode(errors="replace").strip())
            raise Stopped()
        wait = backoff.next()
        if wait is None:
            log("response POST failed for good:", status)
            raise Stopped()
        log("response POST failed, retrying:", status, body[:200])
        time.sleep(wait)


def build_responses(relay, args, rid, status, headers, read_block, started):
    """Posts the backend's answer as messages, as the Go client's buildResponses does."""
    blocks = queue.Queue(maxsize=1)  # Go hands blocks over an unbuffered channel
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                block = read_block()
            except Exception as e:  # noqa: BLE001 - any read failure ends the body
                blocks.put(("end", e))
                return
            if not block:
                blocks.put(("end", None))
                return
            blocks.put(("data", block))

    threading.Thread(target=reader, daemon=True).start()
    pending = bytearray()
    header_sent = False
    idle_ticks = 0
    next_tick = time.monotonic() + 0.1

    def send(eof):
        nonlocal header_sent, pending, idle_ticks
        message = encode_response(
            rid,
            status=None if header_sent else status,
            headers=() if header_sent else headers,
            body=pending,
            eof=True if eof else None,
            duration_ms=int((time.monotonic() - started) * 1000) if eof else None,
        )
        header_sent = True
        pending = bytearray()
        idle_ticks = 0
        post_message(relay, message)

    try:
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                kind, value = blocks.get(timeout=timeout)
            except queue.Empty:
                next_tick += 0.1
                if pending or not header_sent:
                    send(False)
                else:
                    idle_ticks += 1
                    if idle_ticks >= 31:
                        send(False)  # keep-alive: an empty message
                continue
            if kind == "end":
                send(True)
                return
            pending += value
            if len(pending) > args.max_chunk_size:
                send(False)
    finally:
        stop.set()


def backend_connection(args):
    host = args.backend_address
    if args.backend_scheme == "https":
        return http.client.HTTPSConnection(host, context=ssl._create_unverified_context())
    return http.client.HTTPConnection(host)


def handle_request(relay, args, req):
    started = time.monotonic()
    rid = req["id"]
    url = req["url"]
    target = url[len(URL_ORIGIN):] if url.startswith(URL_ORIGIN) else "/"
    path = args.backend_path + target
    host = req["host"] if args.preserve_host and req["host"] else args.backend_address
    upgrade = any(n.lower() == b"upgrade" for n, _ in req["headers"])
    try:
        if upgrade:
            return handle_upgrade(relay, args, req, path, host, started)
        conn = backend_connection(args)
        conn.putrequest(req["method"], path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in req["headers"]:
            conn.putheader(name.decode("latin-1"), value)
        if req["body"] or req["method"] in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(req["body"])))
        conn.endheaders(req["body"] or None)
        sock = conn.sock
        resp = conn.getresponse()
    except Stopped:
        return
    except Exception as e:  # noqa: BLE001 - the Go client answers every failure with 500
        msg = f"Backend request failed with error: {e}".encode()
        try:
            post_message(relay, encode_response(
                rid, 500, [(b"Content-Type", b"text/plain")], msg, True))
        except Stopped:
            pass
        return
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in resp.getheaders()
               if n.lower() != "transfer-encoding"]
    try:
        build_responses(relay, args, rid, resp.status, headers,
                        lambda: resp.read1(args.block_size), started)
    except Stopped:
        pass
    finally:
        # Dropping the backend request: its connection closes (a shutdown also wakes the
        # reader thread blocked on it).
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        resp.close()
        conn.close()


def handle_upgrade(relay, args, req, path, host, started):
    rid = req["id"]
    sock = socket.create_connection(split_address(args.backend_address))
    head = f"{req['method']} {path} HTTP/1.1\r\nHost: {host}\r\n".encode("latin-1")
    for name, value in req["headers"]:
        head += name + b": " + value + b"\r\n"
    sock.sendall(head + b"\r\n" + req["body"])
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("backend closed before answering")
        raw += chunk
    head, extra = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
    first = [extra] if extra else []

    def read_block():
        if first:
            return first.pop()
        return sock.recv(args.block_size)

    if status == 101:
        threading.Thread(target=stream_to_backend, args=(relay, rid, sock), daemon=True).start()
    try:
        build_responses(relay, args, rid, status, headers, read_block, started)
    except Stopped:
        pass
    finally:
        sock.close()


def stream_to_backend(relay, rid, sock):
    """The user's bytes after a 101: one requeststream call per chunk, no retries."""
    while True:
        try:
            status, body = relay.call("POST", f"/server/requeststream?id={rid}", b"")
        except OSError:
            break
        if status != 200:
            break
        if body:
            try:
                sock.sendall(body)
            except OSError:
                break
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def split_address(address):
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- the poll loop


def worker(relay, args):
    backoff = Backoff(0.1, 1.5, 10.0)
    while True:
        try:
            status, body = relay.call("GET", f"/server/request?server={args.server_name}")
        except OSError as e:
            log("poll failed:", e)
            time.sleep(backoff.next())
            continue
        if status == 200:
            backoff.reset()
            req = decode_request(body)
            threading.Thread(target=handle_request, args=(relay, args, req), daemon=True).start()
        elif status == 408:
            backoff.reset()
        elif status == 403:
            log("poll refused with 403, exiting:", body.decode(errors="replace").strip())
            sys.stdout.flush()
            os._exit(1)
        else:
            log(f"poll failed: {status}", body.decode(errors="replace").strip())
            time.sleep(backoff.next())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend_scheme", default="https")
    p.add_argument("--backend_address", default="localhost:8080")
    p.add_argument("--backend_path", default="")
    p.add_argument("--preserve_host", default="true")
    p.add_argument("--relay_scheme", default="https")
    p.add_argument("--relay_address", default="localhost:8081")
    p.add_argument("--relay_prefix", default="")
    p.add_argument("--server_name", default="server_name")
    p.add_argument("--max_chunk_size", type=int, default=1024 * 1024)
    p.add_argument("--block_size", type=int, default=64 * 1024)
    p.add_argument("--num_pending_requests", type=int, default=1)
    p.add_argument("--disable_auth_for_remote", action="store_true")
    p.add_argument("--relay_token", default="", help="stand-in for Application Default Credentials")
    args = p.parse_args()
    args.preserve_host = args.preserve_host.lower() in ("1", "true")
    relay = Relay(args)
    for _ in range(args.num_pending_requests):
        threading.Thread(target=worker, args=(relay, args), daemon=True).start()
    log("polling", args.server_name)
    threading.Event().wait()


if __name__ == "__main__":
    main()
