"""Kill the replica actor(s) of one Kiln model on a running Ray cluster, from a process of its own (a Ray driver):

    RAY_AUTH_MODE=token python kill_replica.py RAY_ADDRESS MODEL

Connects, finds the actors, prints `ready`, waits for a line on stdin, kills them, waits until they are gone and
prints their names as one JSON list. (Connecting takes seconds; the kill itself then lands when the caller says.)
"""
from __future__ import annotations

import json
import sys
import time

import ray


def main(address: str, model: str) -> int:
    ray.init(address=address, logging_level="ERROR")
    try:
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{model}#")]
        handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
        print("ready", flush=True)
        sys.stdin.readline()
        for h in handles:
            ray.kill(h, no_restart=True)
        end = time.monotonic() + 30
        while names:  # ray.kill only asks: wait until the actors are gone
            alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            if not any(a["name"] in alive for a in names):
                break
            if time.monotonic() > end:
                raise SystemExit(f"replica actors still alive 30 s after ray.kill: {names}")
            time.sleep(0.05)
        print(json.dumps([a["name"] for a in names]), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
