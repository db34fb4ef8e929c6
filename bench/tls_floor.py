"""The transfer floor of a round: N concurrent mutual-TLS 1.3 connections on 127.0.0.1, each receiving ``nbytes``
and then sending ``nbytes`` (a site downloading the model, then uploading its update), with nothing else done.

The server is its own process (``python bench/tls_floor.py --serve ...``: the coordinator's side), the N clients are
threads of the calling process (the sites' side); both use Python's ``ssl`` module (OpenSSL), which releases the GIL
while it encrypts, decrypts and moves bytes, with the federation's real certificates (ECDSA P-256). All N handshakes
finish before the clock starts (Cohort's channels are long-lived); the clock stops when every client has received
the server's acknowledgement that its upload arrived whole. :func:`measure` returns the seconds of each repetition.

    .venv/bin/python bench/tls_floor.py --sites 20 --bytes 40000000 --certs DIR   # prints the seconds
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

BUF = 1 << 20
GO, ACK = b"g", b"k"


def _context(server: bool, certs: Path, identity: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certs / identity / "tls.crt", certs / identity / "tls.key")
    ctx.load_verify_locations(certs / "ca" / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _recv_exact(conn: ssl.SSLSocket, nbytes: int, buf: bytearray) -> None:
    view = memoryview(buf)
    left = nbytes
    while left:
        got = conn.recv_into(view, min(left, len(buf)))
        if not got:
            raise ConnectionError(f"peer closed with {left} bytes outstanding")
        left -= got


def _serve_one(conn: ssl.SSLSocket, nbytes: int, payload: bytes) -> None:
    buf = bytearray(BUF)
    with conn:
        while True:
            cmd = conn.recv(1)
            if cmd != GO:
                return
            conn.sendall(payload)
            _recv_exact(conn, nbytes, buf)
            conn.sendall(ACK)


def serve(sites: int, nbytes: int, certs: Path, port_file: Path) -> None:
    """Accept ``sites`` connections; on every GO send ``nbytes``, read ``nbytes`` back, answer ACK."""
    ctx = _context(True, certs, "coordinator")
    payload = bytes(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(listener.getsockname()[1]))
        tmp.replace(port_file)
        threads = []
        for _ in range(sites):
            raw, _ = listener.accept()
            conn = ctx.wrap_socket(raw, server_side=True)
            t = threading.Thread(target=_serve_one, args=(conn, nbytes, payload), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()


@contextlib.contextmanager
def _server(sites: int, nbytes: int, certs: Path, work: Path) -> Iterator[int]:
    port_file = work / "tls-floor.port"
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--sites", str(sites), "--bytes", str(nbytes)]
    proc = subprocess.Popen([*argv, "--certs", str(certs), "--port-file", str(port_file)])
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the TLS floor server did not start")
            time.sleep(0.02)
        yield int(port_file.read_text())
    finally:
        proc.kill()
        proc.wait()


def measure(sites: int, nbytes: int, certs: Path, work: Path, repeats: int = 5, client: str = "") -> list[float]:
    """Seconds for ``sites`` connections to each receive and then send ``nbytes``, once per repetition."""
    client = client or next(p.name for p in sorted((certs / "sites").iterdir()))
    ctx = _context(False, certs, f"sites/{client}")
    with _server(sites, nbytes, certs, work) as port:
        # wrap_socket completes each handshake (the client's certificate included) before the next connection.
        conns = [
            ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            for _ in range(sites)
        ]
        payload = bytes(nbytes)
        results: list[float] = []
        try:
            for _ in range(repeats):
                start = threading.Barrier(sites + 1)
                errors: list[BaseException] = []

                def one(
                    conn: ssl.SSLSocket, start: threading.Barrier = start, errors: list[BaseException] = errors
                ) -> None:
                    try:
                        buf = bytearray(BUF)
                        start.wait()
                        conn.sendall(GO)
                        _recv_exact(conn, nbytes, buf)
                        conn.sendall(payload)
                        if conn.recv(1) != ACK:
                            raise ConnectionError("no acknowledgement from the floor server")
                    except BaseException as exc:
                        errors.append(exc)

                threads = [threading.Thread(target=one, args=(c,)) for c in conns]
                for t in threads:
                    t.start()
                start.wait()
                t0 = time.perf_counter()
                for t in threads:
                    t.join()
                results.append(time.perf_counter() - t0)
                if errors:
                    raise RuntimeError(f"TLS floor transfer failed: {errors[0]!r}")
        finally:
            for c in conns:
                c.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--certs", type=Path, required=True, help="a federation directory (cohort certs init)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.sites, args.bytes, args.certs, args.port_file)
        return 0
    times = measure(args.sites, args.bytes, args.certs, args.certs.parent, args.repeats)
    print(" ".join(f"{t:.4f}" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
