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
IDLE = re.compile(
    r"epoll_wait|select \(|_run_once.*select|poll \(|wait \(threading|acquire|sleep|futex|pthread_cond|"
    r"_worker \(concurrent|queue\.py|get \(queue|do_epoll|cq_next|completion_queue_next"
)


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
    idle = sum(c for frames, c in stacks if IDLE.search(frames[-1]))
    busy = [(f, c) for f, c in stacks if not IDLE.search(f[-1])]
    busy_total = max(1, total - idle)
    inclusive: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    for frames, count in busy:
        joined = ";".join(frames)
        for name, pattern in CATEGORIES:
            if re.search(pattern, joined):
                inclusive[name] += count
        selfs[re.sub(r" \(.*", "", frames[-1]) + _where(frames[-1])] += count
    lines = [f"## {path.name}: {total} samples, {idle} idle ({idle / max(1, total):.0%}), {busy_total} busy", ""]
    lines += ["| category (inclusive, of busy samples) | share |", "|---|---:|"]
    lines += [f"| {name} | {inclusive[name] / busy_total:.1%} |" for name, _ in CATEGORIES if inclusive[name]]
    lines += ["", "| top of stack (self, of busy samples) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {count / busy_total:.1%} |" for name, count in selfs.most_common(top)]
    return "\n".join(lines) + "\n"


def _where(frame: str) -> str:
    m = re.search(r"\(([^)]*)\)", frame)
    if not m:
        return ""
    where = m.group(1)
    return f" ({where.rsplit('/', 1)[-1]})"


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
