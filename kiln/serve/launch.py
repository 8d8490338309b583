"""Start and stop `kiln serve` on Ray: a local Ray instance, or an existing cluster (`address`)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.errors import KilnError
from kiln.serve.config import ServeConfig
from kiln.serve.plans import ServedModel
from kiln.settings import openmp_spin_count, ray_auth_mode_set


@dataclass
class Server:
    """A running `kiln serve`: its URL, the models it deployed, where Ray is, and how to stop it."""

    url: str
    models: list[str]
    ray_address: str
    metrics_urls: list[str]
    local: bool
    notes: list[str] = field(default_factory=list)
    plan_refs: list[Any] = field(default_factory=list)  # the plans in Ray's object store, owned by this process

    def stop(self) -> None:
        """Remove this server's models; a local Ray instance is shut down with Serve, on a cluster the /v2
        application stays while other Kiln models are deployed there."""
        import ray
        from ray import serve

        from kiln.serve.app import SERVER_APP, model_states
        try:
            if self.local:
                serve.shutdown()
            else:
                for name in self.models:
                    serve.delete(name)
                if not model_states():
                    serve.delete(SERVER_APP)
        finally:
            ray.shutdown()


def _http_config() -> tuple[str, int] | None:
    """(host, port) of the running Serve HTTP proxy, read from Serve's client; None where Serve hides it."""
    try:
        from ray.serve.context import _get_global_client
        cfg = _get_global_client().http_config
        return str(cfg.host), int(cfg.port)
    except Exception:
        return None


def start(cfg: ServeConfig, models: list[ServedModel], port_given: bool = True,
          log: Callable[[str], None] | None = None) -> Server:
    """Start Ray (or join `cfg.address`), Serve's HTTP proxy, one application per model and the /v2 application;
    returns once every application is running. KilnError (one line) when the cluster cannot run them.
    `log` is told what the caller should know before the wait (a cluster short of resources)."""
    import ray
    from ray import serve
    from ray.serve import RunTarget

    from kiln import __version__
    from kiln.serve.app import MODEL_DEPLOYMENT, SERVER_APP, KilnModel, KilnServer

    local = cfg.address is None
    gpus_each = cfg.num_gpus if cfg.num_gpus is not None else 1.0
    need_cpu = sum(cfg.replicas * cfg.num_cpus for _ in models)
    need_gpu = sum(cfg.replicas * gpus_each for m in models if m.device == "cuda")
    notes: list[str] = []
    if local:
        # Ray starts its workers at nice 15 by default: a replica and the HTTP proxy would then get the CPU only
        # when nothing else wants it. A server's workers run at normal priority.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(-(-need_cpu // 1))), include_dashboard=False,
                 logging_level=logging.WARNING, namespace="kiln", _system_config={"worker_niceness": 0})
    else:
        try:
            ray.init(address=cfg.address, logging_level=logging.WARNING, namespace="kiln")
        except (ConnectionError, ValueError, RuntimeError) as e:
            hint = ""
            if not ray_auth_mode_set() and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
                hint = "; if the cluster uses Ray's token authentication, set RAY_AUTH_MODE=token"
            raise KilnError(f"--address {cfg.address}: cannot join the Ray cluster "
                            f"({(str(e).splitlines() or [type(e).__name__])[0]}){hint}") from None
    have = ray.cluster_resources()
    for what, need, key in (("CPUs", need_cpu, "CPU"), ("GPUs", need_gpu, "GPU")):
        if need > have.get(key, 0):
            msg = f"the replicas need {need:g} {what}, the Ray cluster has {have.get(key, 0):g}"
            if local:
                ray.shutdown()
                raise KilnError(msg + ("; lower --replicas or --num-cpus" if key == "CPU" else ""))
            notes.append(f"warning: {msg}; replicas wait until the cluster has them")
            if log is not None:
                log(notes[-1])
    logs = {"enable_access_log": False, "log_level": "WARNING"}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # the proxy's own end-to-end limit, a little past the replicas' (--request-timeout): a request that a dying
    # replica never answers gets an error status from the proxy instead of hanging
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 5},
                logging_config=logs)
    actual = _http_config()
    if actual is not None and actual != (cfg.host, cfg.port):
        if not local and port_given:
            raise KilnError(f"Ray Serve already listens on {actual[0]}:{actual[1]} on this cluster; "
                            "leave out --host/--port or pass those")
        host, port = actual
    else:
        host, port = cfg.host, cfg.port
    env = {"OMP_NUM_THREADS": str(cfg.threads()), "GOMP_SPINCOUNT": openmp_spin_count()}
    try:
        targets, refs = [], []
        for m in models:
            ref = ray.put(m.data)
            refs.append(ref)
            actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "runtime_env": {"env_vars": env}}
            if m.device == "cuda":
                actor["num_gpus"] = gpus_each
            options = {"threads": cfg.threads(), "max_batch": m.max_batch, "batch_timeout_ms": cfg.batch_timeout_ms,
                       "contexts": cfg.contexts, "request_timeout_s": cfg.request_timeout_s, "buckets": cfg.buckets}
            # health checks every 2 s (Serve's default is 10): a dead replica is replaced sooner
            app = KilnModel.options(name=MODEL_DEPLOYMENT, num_replicas=cfg.replicas, health_check_period_s=2,
                                    max_ongoing_requests=cfg.max_ongoing_requests,
                                    ray_actor_options=actor).bind(m.name, [ref], options)
            targets.append(RunTarget(app, name=m.name, route_prefix=f"/v2/models/{m.name}", logging_config=logs))
        targets.append(RunTarget(KilnServer.bind(__version__), name=SERVER_APP, route_prefix="/v2",
                                 logging_config=logs))
        serve.run_many(targets)  # the replicas of every model start together; returns once all run
    except KilnError:
        raise
    except Exception as e:  # a replica that cannot start (plan refused on a worker, ...): one line
        raise KilnError(f"kiln serve: deployment failed: {(str(e).strip().splitlines() or [type(e).__name__])[-1]}") \
            from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    metrics = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
               if n.get("Alive") and n.get("MetricsExportPort")]
    return Server(f"http://{shown}:{port}", [m.name for m in models], ray.get_runtime_context().gcs_address,
                  metrics, local, notes, refs)
