"""Summarise py-spy profiles (``py-spy record --format raw``: collapsed stacks, one ``frame;frame;... count`` a line).

Prints, for each file, where the samples went: the share of samples whose stack passes through each category
(inclusive: a sample counts once per category it touches, so shares add up to more than 100 %) and the functions
with the most samples at the top of the stack (self time). Idle samples (threads waiting in epoll, locks, sleeps,
queues) are counted apart and left out of the shares: py-spy samples every thread, busy or not.

    .venv/bin/python bench/profile_summary.py bench/results/profiles/*.txt
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

# First match wins for "self"; inclusive shares test every category.
CATEGORIES: list[tuple[str, str]] = [
    ("SHA-256 / digests", r"hashlib|sha256|_hashlib|openssl_sha|update \(.*serde|SHA256"),
    ("spool file write", r"UpdateSpool\.write|spool.*write|\bwrite \(.*aggregation"),
    ("spool read, finite check, fold at close", r"check_finite_file|l2_norm_file|add_file|add_block|_fold \("),
    ("fixed-point fold", r"accumulator\.py"),
    ("model save / encode", r"model_store|save_file|safetensors|serde\.py:\d+\)?;?.*encode|\bencode \("),
    ("protobuf", r"protobuf|_message|FromString|SerializeToString|upb"),
    ("gRPC (Python + core)", r"grpc|cygrpc|_cython|aio"),
    ("TLS (OpenSSL)", r"libssl|libcrypto|SSL_|ssl3_|tls1|aes|gcm|EVP_"),
    ("torch / training", r"torch|autograd|backward|optim|linear"),
    ("numpy", r"numpy"),
    ("sqlite", r"sqlite|store\.py"),
    ("secure aggregation", r"secagg"),
    ("asyncio event loop", r"asyncio|base_events|selector"),
]
# A thread waiting: for its queue or a lock, in epoll (the event loop, gRPC's poller), asleep. Tested on the last
# frames of a stack (native stacks end in libc addresses below the wait).
IDLE = re.compile(
    r"epoll_wait|select_epoll_poll|EpollSelector\.select|_queue_SimpleQueue_get|PyThread_acquire_lock|"
    r"wait \(threading|Condition\.wait|acquire|sleep|futex|pthread_cond_wait|_worker \(concurrent[^;]*$|"
    r"get \(queue|completion_queue_next|cq_next"
)
TAIL = 4  # frames from the top of the stack that decide whether a sample is idle


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(path: Path, top: int) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks)
    idle = sum(c for frames, c in stacks if IDLE.search(";".join(frames[-TAIL:])))
    busy = [(f, c) for f, c in stacks if not IDLE.search(";".join(f[-TAIL:]))]
    busy_total = max(1, total - idle)
    inclusive: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    for frames, count in busy:
        joined = ";".join(frames)
        for name, pattern in CATEGORIES:
            if re.search(pattern, joined):
                inclusive[name] += count
        selfs[_name(frames[-1])] += count
    lines = [f"## {path.name}: {total} samples, {idle} idle ({idle / max(1, total):.0%}), {busy_total} busy", ""]
    lines += ["| category (inclusive, of busy samples) | share |", "|---|---:|"]
    lines += [f"| {name} | {inclusive[name] / busy_total:.1%} |" for name, _ in CATEGORIES if inclusive[name]]
    lines += ["", "| top of stack (self, of busy samples) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {count / busy_total:.1%} |" for name, count in selfs.most_common(top)]
    return "\n".join(lines) + "\n"


def _name(frame: str) -> str:
    """A frame without its address; unsymbolised addresses of one library count together."""
    if frame.startswith("0x"):
        return f"(unsymbolised code in {frame.split(' ', 1)[-1].strip('()')})"
    m = re.search(r"\(([^)]*)\)", frame)
    where = f" ({m.group(1).rsplit('/', 1)[-1]})" if m else ""
    return re.sub(r" \(.*", "", frame) + where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
