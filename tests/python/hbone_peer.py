"""An HBONE peer written apart from mesh (Python's ssl and the h2 package), to prove mesh's wire
format both ways: HTTP/2 CONNECT streams (:authority = destination IP:port) in TLS 1.3 with
both sides' workload certificates, ALPN h2, SPIFFE identities in URI SANs.

  hbone_peer.py client --cert C --key K --ca ROOT --connect HOST:PORT --server-name NAME
                       --expect-peer URI --authority IP:PORT --size N
      one tunnel: sends N bytes, ends the stream (half-close), reads until the peer ends its
      side; prints {"status", "peer", "sent", "received", "echo_ok"}
  hbone_peer.py server --cert C --key K --ca ROOT --listen HOST:PORT --expect-peer URI
      prints {"serving": ...}; per tunnel, connects to :authority and splices both ways (with
      half-close), then prints {"peer", "authority", "up", "down"}
"""
import argparse
import json
import selectors
import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events

CHUNK = 16384


def uri_sans(cert):
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def context(args, server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        # Workload certificates name SPIFFE ids, not hosts: the id is checked below.
        ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    return ctx


def pattern(n):
    return bytes((i * 7) % 251 for i in range(n))


def pump(conn, sock):
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the peer closed the connection")
    events = conn.receive_data(data)
    sock.sendall(conn.data_to_send())
    return events


def client(args):
    raw = socket.create_connection(tuple_addr(args.connect), timeout=20)
    sock = context(args, server=False).wrap_socket(raw, server_hostname=args.server_name)
    assert sock.version() == "TLSv1.3", sock.version()
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    peer = uri_sans(sock.getpeercert())
    if peer != [args.expect_peer]:
        print(json.dumps({"error": "wrong peer", "peer": peer}))
        return 1
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", args.authority)])
    sock.sendall(conn.data_to_send())
    status, received, ended = None, bytearray(), False
    while status is None:
        for event in pump(conn, sock):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"].decode()
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
    if status != "200":
        # An answer, not a failure of the peer: the caller checks the status.
        print(json.dumps({"status": status, "peer": peer[0]}))
        return 0
    sent = pattern(args.size)
    # The sender may block on flow control while echoed data piles up: read in between.
    while sent:
        window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(sent))
        if window > 0:
            conn.send_data(stream_id, sent[:window])
            sent = sent[window:]
            sock.sendall(conn.data_to_send())
            continue
        ended = handle_client_events(conn, sock, stream_id, received) or ended
    conn.end_stream(stream_id)
    sock.sendall(conn.data_to_send())
    while not ended:
        ended = handle_client_events(conn, sock, stream_id, received)
    print(json.dumps({"status": status, "peer": peer[0], "sent": args.size, "received": len(received),
                      "echo_ok": bytes(received) == pattern(args.size)}))
    sock.close()
    return 0


def handle_client_events(conn, sock, stream_id, received):
    ended = False
    for event in pump(conn, sock):
        if isinstance(event, h2.events.DataReceived):
            received.extend(event.data)
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            ended = True
        elif isinstance(event, h2.events.StreamReset):
            raise ConnectionError(f"stream reset: {event.error_code}")
    sock.sendall(conn.data_to_send())
    return ended


class Tunnel:
    def __init__(self, upstream, authority):
        self.upstream, self.authority = upstream, authority
        self.pending = bytearray()  # from upstream, waiting for window
        self.up = self.down = 0
        self.upstream_eof = self.client_ended = False


def serve_connection(args, sock, lock):
    peer = uri_sans(sock.getpeercert())
    if peer != [args.expect_peer]:
        with lock:
            print(json.dumps({"refused": peer}), flush=True)
        sock.close()
        return
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    tunnels = {}
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select(timeout=20):
            if key.data is None:
                data = sock.recv(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        authority = headers[b":authority"].decode()
                        host, port = authority.rsplit(":", 1)
                        upstream = socket.create_connection((host, int(port)), timeout=20)
                        tunnels[event.stream_id] = Tunnel(upstream, authority)
                        selector.register(upstream, selectors.EVENT_READ, event.stream_id)
                        conn.send_headers(event.stream_id, [(":status", "200")])
                    elif isinstance(event, h2.events.DataReceived):
                        tunnel = tunnels[event.stream_id]
                        tunnel.upstream.sendall(event.data)
                        tunnel.up += len(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        tunnels[event.stream_id].client_ended = True
                        tunnels[event.stream_id].upstream.shutdown(socket.SHUT_WR)
            else:
                tunnel = tunnels[key.data]
                data = tunnel.upstream.recv(65536)
                if data:
                    tunnel.pending.extend(data)
                    tunnel.down += len(data)
                else:
                    tunnel.upstream_eof = True
                    selector.unregister(tunnel.upstream)
        for stream_id, tunnel in list(tunnels.items()):
            while tunnel.pending:
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(tunnel.pending))
                if window <= 0:
                    break
                conn.send_data(stream_id, bytes(tunnel.pending[:window]))
                del tunnel.pending[:window]
            if tunnel.upstream_eof and not tunnel.pending and tunnel.client_ended:
                conn.end_stream(stream_id)
                tunnel.upstream.close()
                del tunnels[stream_id]
                with lock:
                    print(json.dumps({"peer": peer[0], "authority": tunnel.authority, "up": tunnel.up, "down": tunnel.down}), flush=True)
        sock.sendall(conn.data_to_send())


def server(args):
    ctx = context(args, server=True)
    listener = socket.create_server(tuple_addr(args.listen))
    lock = threading.Lock()
    print(json.dumps({"serving": args.listen}), flush=True)
    while True:
        raw, _ = listener.accept()
        try:
            sock = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with lock:
                print(json.dumps({"handshake_failed": str(e)}), flush=True)
            continue
        threading.Thread(target=serve_connection, args=(args, sock, lock), daemon=True).start()


def tuple_addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["client", "server"])
    for flag in ["--cert", "--key", "--ca", "--expect-peer"]:
        parser.add_argument(flag, required=True)
    parser.add_argument("--connect")
    parser.add_argument("--server-name")
    parser.add_argument("--authority")
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--listen")
    args = parser.parse_args()
    if args.mode == "server":
        return server(args)
    try:
        return client(args)
    except (ssl.SSLError, OSError) as e:
        # Refused (a TLS alert, a closed connection): an answer the caller checks.
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 0


if __name__ == "__main__":
    sys.exit(main())
