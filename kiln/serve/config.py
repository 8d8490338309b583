"""`kiln serve` settings: one ServeConfig for the whole server, checked before Ray starts."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from kiln.errors import KilnError

# a model name is one URL path segment and a Ray Serve application name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ServeConfig:
    """What `kiln serve` runs and how.

    plans: .kiln files, one Ray Serve deployment (and application, at /v2/models/{name}) each.
    names: model names, one per plan (default: each plan file's stem).
    replicas: Ray Serve replicas per model; each loads one Engine.
    contexts: execution contexts per replica: batches one replica runs at the same time.
    max_batch: rows per dynamic batch (None: the plan's largest profile batch); 1 turns batching off. One value
        for every plan, or a list with one per plan.
    batch_timeout_ms: how long the oldest waiting request waits for others to join its batch.
    buckets: pad each batch up to the next power of two (within the profile), so an engine meets a few batch
        sizes, each warmed up when a replica starts; False runs every batch at its own size.
    request_timeout_s: a request without a result after this long gets 504 (a request's own `timeout`
        parameter, in microseconds, overrides it).
    host / port: where Ray Serve's HTTP proxy listens (127.0.0.1 by default: pass 0.0.0.0 to be reachable).
    address: an existing Ray cluster ('auto' or the head's host:port); None starts a local Ray instance.
    num_cpus: Ray CPUs per replica (also its OpenMP threads). num_gpus: GPU fraction per replica of a CUDA
        plan (default 1 / the replicas that share a GPU: 1.0 unless given).
    max_ongoing_requests: requests one replica accepts at once (queued in its batcher).
    """

    plans: list[str]
    names: list[str] = field(default_factory=list)
    replicas: int = 1
    contexts: int = 1
    max_batch: int | list[int] | None = None
    batch_timeout_ms: float = 2.0
    buckets: bool = True
    request_timeout_s: float = 60.0
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_ongoing_requests: int = 256

    def __post_init__(self) -> None:
        self.plans = [os.fspath(p) for p in self.plans]
        if not self.names:
            self.names = [os.path.splitext(os.path.basename(p))[0] for p in self.plans]

    def validate(self) -> None:
        """Raise a KilnError (one line) naming the first bad setting."""
        if not self.plans:
            raise KilnError("kiln serve: no plan given")
        if len(self.names) != len(self.plans):
            raise KilnError(f"--name given {len(self.names)} times for {len(self.plans)} plans; "
                            "give one name per plan or none")
        for n in self.names:
            if not _NAME.match(n):
                raise KilnError(f"model name '{n[:60]}' must be 1-128 letters, digits, '_', '.' or '-' "
                                "(starting with a letter or digit); rename the plan or pass --name")
        dup = next((n for i, n in enumerate(self.names) if n in self.names[:i]), None)
        if dup is not None:
            raise KilnError(f"two plans are served as '{dup}'; pass --name to tell them apart")
        for what, v, lo in (("--replicas", self.replicas, 1), ("--contexts", self.contexts, 1),
                            ("--max-ongoing-requests", self.max_ongoing_requests, 1)):
            if not isinstance(v, int) or v < lo:
                raise KilnError(f"{what} must be an integer >= {lo}, got {v}")
        batches = self.max_batch if isinstance(self.max_batch, list) else [self.max_batch]
        if isinstance(self.max_batch, list) and len(batches) not in (1, len(self.plans)):
            raise KilnError(f"--max-batch given {len(batches)} times for {len(self.plans)} plans; "
                            "give it once for all or once per plan")
        for b in batches:
            if b is not None and (not isinstance(b, int) or b < 1):
                raise KilnError(f"--max-batch must be an integer >= 1, got {b}")
        if not 0 <= self.batch_timeout_ms <= 60_000:
            raise KilnError(f"--batch-timeout-ms must be in [0, 60000], got {self.batch_timeout_ms:g}")
        if not self.request_timeout_s > 0:
            raise KilnError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s:g}")
        if not 1 <= self.port <= 65535:
            raise KilnError(f"--port must be in [1, 65535], got {self.port}")
        if not self.num_cpus > 0:
            raise KilnError(f"--num-cpus must be > 0, got {self.num_cpus:g}")
        if self.num_gpus is not None and not 0 < self.num_gpus <= 1 and not float(self.num_gpus).is_integer():
            raise KilnError(f"--num-gpus must be a fraction in (0, 1] or a whole number, got {self.num_gpus:g}")
        if self.num_gpus is not None and self.num_gpus <= 0:
            raise KilnError(f"--num-gpus must be > 0, got {self.num_gpus:g}")

    def max_batch_of(self, i: int) -> int | None:
        """The --max-batch of the i-th plan (None: the plan's own largest batch)."""
        if isinstance(self.max_batch, list):
            return self.max_batch[i if len(self.max_batch) > 1 else 0] if self.max_batch else None
        return self.max_batch

    def threads(self) -> int:
        """OpenMP / intra-op threads of one replica: its whole CPUs, at least one."""
        return max(1, int(self.num_cpus))
