"""Ray Serve applications of `kiln serve`: one per model at /v2/models/{name}, and one at /v2 for the server.

Each model is its own Ray Serve application whose route prefix is `/v2/models/{name}`, so Ray Serve's HTTP
proxy hands its requests straight to a replica of that model (no second hop through an ingress). A replica
(`KilnModel`) loads one Engine from the plan's bytes, creates its execution contexts and a DynamicBatcher,
and answers metadata, readiness, configuration, statistics and infer requests. The `/v2` application
(`KilnServer`) answers server liveness, readiness (every model's application running), server metadata, the
repository index, and 404 for models it does not serve.

Metrics go through `ray.serve.metrics` (Prometheus, at each Ray node's metrics export port, prefixed `ray_`):
kiln_requests_total{model,code}, kiln_request_latency_ms, kiln_batch_size (rows per execute) and
kiln_queue_time_ms histograms.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from kiln.serve import protocol
from kiln.serve.model import BadRequest, NotFound, ServeError

VERSION = "1"  # one plan per model name: its only version
SERVER_APP = "_kiln"  # the /v2 application; model names start with a letter or digit, so never this
LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_ROWS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status_code=status,
                    media_type="application/json")


def _error(e: ServeError | str, status: int | None = None) -> Response:
    msg = e if isinstance(e, str) else (str(e).splitlines() or [type(e).__name__])[0]
    return Response(protocol.error_body(msg), status_code=status or getattr(e, "status", 500),
                    media_type="application/json")


class _Metrics:
    """The replica's Prometheus metrics (ray.serve.metrics adds deployment/replica/application tags)."""

    def __init__(self, model: str) -> None:
        from ray.serve import metrics
        self.requests = metrics.Counter("kiln_requests_total", tag_keys=("model", "code"),
                                        description="inference requests answered, by HTTP status")
        self.requests.set_default_tags({"model": model})
        self.latency = metrics.Histogram("kiln_request_latency_ms", description="inference request latency in the "
                                         "replica (ms): queue + batch + execute", boundaries=LATENCY_MS,
                                         tag_keys=("model",))
        self.latency.set_default_tags({"model": model})
        self.batch = metrics.Histogram("kiln_batch_size", description="rows per execute of the dynamic batcher",
                                       boundaries=BATCH_ROWS, tag_keys=("model",))
        self.batch.set_default_tags({"model": model})
        self.queue = metrics.Histogram("kiln_queue_time_ms", description="time a request waited before its batch "
                                       "ran (ms)", boundaries=LATENCY_MS, tag_keys=("model",))
        self.queue.set_default_tags({"model": model})


@serve.deployment
class KilnModel:
    """A replica of one model: one Engine, `contexts` execution contexts, one dynamic batcher."""

    def __init__(self, name: str, plan: list, options: dict[str, Any]) -> None:
        import ray
        import torch

        from kiln.serve.batching import DynamicBatcher
        from kiln.serve.plans import load_engine
        torch.set_num_threads(int(options["threads"]))
        data = ray.get(plan[0]) if not isinstance(plan[0], (bytes, bytearray)) else plan[0]
        self.name = name
        self.engine: Any = load_engine(data, f"model '{name}'")
        from kiln.serve.model import ModelSignature
        p = self.engine.plan
        self.sig = ModelSignature.from_header(p.inputs, p.outputs, p.profiles, f"model '{name}'")
        self.max_batch = int(options["max_batch"])
        self.batch_timeout_ms = float(options["batch_timeout_ms"])
        self.contexts = int(options["contexts"])
        self.metrics = _Metrics(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batcher = DynamicBatcher(self.sig, [self._executor() for _ in range(self.contexts)],
                                      max_batch=self.max_batch, batch_timeout_ms=self.batch_timeout_ms,
                                      timeout_s=float(options["request_timeout_s"]), buckets=bool(options["buckets"]),
                                      on_batch=self._on_batch, on_queue=self.metrics.queue.observe)
        for line in self.batcher.warm_up():
            logging.getLogger("ray.serve").warning(f"model '{name}': {line}")

    def _executor(self) -> Any:
        """One execution context as a callable; on CUDA it runs on its own stream."""
        ctx = self.engine.create_execution_context()
        if self.engine.device.type != "cuda":
            return ctx.execute
        import torch
        stream = torch.cuda.Stream(self.engine.device)

        def run(inputs: dict[str, Any]) -> dict[str, Any]:
            with torch.cuda.stream(stream):
                return ctx.execute(inputs)
        return run

    def _on_batch(self, rows: int) -> None:  # from the batcher's worker thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.metrics.batch.observe, rows)

    async def __call__(self, request: Request) -> Response:
        self._loop = self._loop or asyncio.get_running_loop()
        prefix = f"/v2/models/{self.name}"
        path = request.url.path
        rest = path[len(prefix):] if path.startswith(prefix) else path
        if rest.startswith("/versions/"):
            version, _, tail = rest[len("/versions/"):].partition("/")
            if version != VERSION:
                return _error(f"model '{self.name}' has no version '{version[:20]}'; it serves version {VERSION}", 404)
            rest = "/" + tail if tail else ""
        rest = rest.rstrip("/")
        if rest == "/infer":
            if request.method != "POST":
                return _error("infer takes POST", 405)
            return await self._infer(request)
        if request.method != "GET":
            return _error(f"{request.method} is not allowed here", 405)
        if rest == "":
            return _json(protocol.model_metadata(self.name, VERSION, self.sig))
        if rest == "/ready":
            return Response(status_code=200)
        if rest == "/config":
            return _json(protocol.model_config(self.name, self.sig, self.max_batch, self.batch_timeout_ms,
                                               self.contexts))
        if rest == "/stats":
            return _json({"model_stats": [self._stats()]})
        return _error(f"no route {path[:100]} for model '{self.name}'", 404)

    async def _infer(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await request.body()
            req = protocol.decode_request(body, request.headers.get(protocol.HEADER_LENGTH), self.sig,
                                          request.headers.get("content-encoding"))
            outs = await self.batcher.infer(req.inputs, req.timeout_s)
            payload, headers = protocol.encode_response(self.name, VERSION, req.id, outs, self.sig, req.outputs,
                                                        req.binary_output, request.headers.get("accept-encoding"))
            resp = Response(payload, status_code=200, headers=headers)
        except ServeError as e:
            resp = _error(e)
        except Exception as e:  # one line, never a traceback page
            resp = _error(f"internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", 500)
        self.metrics.requests.inc(tags={"code": str(resp.status_code)})
        self.metrics.latency.observe((time.perf_counter() - t0) * 1e3)
        return resp

    def _stats(self) -> dict[str, Any]:
        """Triton's statistics extension for this replica."""
        s = self.batcher.stats

        def d(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}
        zero = d(0, 0)
        return {"name": self.name, "version": VERSION, "last_inference": s.last_inference_ms,
                "inference_count": s.inferences, "execution_count": s.executions,
                "inference_stats": {"success": d(s.success, s.success_ns), "fail": d(s.fail, s.fail_ns),
                                    "queue": d(s.success + s.fail, s.queue_ns), "compute_input": zero,
                                    "compute_infer": d(s.executions, s.compute_ns), "compute_output": zero,
                                    "cache_hit": zero, "cache_miss": zero},
                "batch_stats": [{"batch_size": rows, "compute_input": zero, "compute_infer": d(c, ns),
                                 "compute_output": zero} for rows, (c, ns) in sorted(s.batches.items())]}

    async def __del__(self) -> None:
        """Ray Serve calls this on a graceful stop: waiting requests fail with 503, running batches finish."""
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            await batcher.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


MODEL_DEPLOYMENT = "KilnModel"  # the deployment name in every model's application: how /v2 finds the models


def model_states() -> dict[str, str]:
    """Every Kiln model application on the cluster (any `kiln serve` that deployed one) -> its Serve status."""
    apps = serve.status().applications
    return {name: app.status.value for name, app in sorted(apps.items()) if MODEL_DEPLOYMENT in app.deployments}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class KilnServer:
    """The /v2 routes that belong to no model: server metadata, liveness, readiness (every Kiln model
    application on the cluster running), the repository index, and 404 naming the models that exist."""

    def __init__(self, kiln_version: str) -> None:
        self.version = kiln_version

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path in ("/v2", "") and request.method == "GET":
            return _json({"name": "kiln", "version": self.version,
                          "extensions": ["binary_tensor_data", "model_configuration", "statistics"]})
        if path == "/v2/health/live":
            return Response(status_code=200)
        if path == "/v2/health/ready":
            states = await asyncio.to_thread(model_states)
            bad = next(((m, s) for m, s in states.items() if s != "RUNNING"), None)
            if not states:
                return _error("no model is deployed", 503)
            return Response(status_code=200) if bad is None else _error(f"model '{bad[0]}' is {bad[1]}", 503)
        if path == "/v2/repository/index" and request.method == "POST":
            states = await asyncio.to_thread(model_states)
            return _json([{"name": m, "version": VERSION, "state": "READY" if s == "RUNNING" else "UNAVAILABLE",
                           "reason": "" if s == "RUNNING" else s} for m, s in states.items()])
        if path.startswith("/v2/models/"):
            name = path[len("/v2/models/"):].split("/")[0]
            states = await asyncio.to_thread(model_states)
            return _error(NotFound(f"unknown model '{name[:60]}'; models: {', '.join(states) or 'none'}"))
        return _error(BadRequest(f"no route {path[:100]}"), 404)
