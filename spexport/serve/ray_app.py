"""`spexport serve --ray`: the same API as a Ray Serve deployment, one model and one batching scheduler per replica.

Ray Serve's proxy takes each HTTP request and hands it to a replica, which answers it with the same route
handlers as the single-process server. Every node that runs a replica needs spexport and the artifact at the
same path (or on shared storage).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from spexport.serve import require

DEPLOYMENT = "spexport"


class Replica:
    """A Ray Serve replica: loads the artifact, starts its scheduler, and routes requests to the handlers."""

    def __init__(self, folder: str, max_batch_size: int):
        from spexport.runtime import load
        from spexport.serve.app import Server

        self.server = Server(load(folder), max_batch_size)
        self.server.start()
        self.routes = {(path, method): route.endpoint for route in self.server.routes()
                       for path in [route.path] for method in route.methods or ()}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    async def __call__(self, request):
        from spexport.serve.app import error_response
        from spexport.serve.protocol import RequestError

        handler = self.routes.get((request.url.path, request.method))
        if handler is None:
            response = error_response(RequestError(f"{request.method} {request.url.path}: Not Found", status=404,
                                                   code="not_found"))
        else:
            response = await handler(request)
        response.headers["x-spexport-replica"] = self.name
        return response

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None and server.scheduler is not None and server.scheduler.thread.is_alive():
            server.stop()


def serve_on_ray(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                 max_batch_size: int = 64) -> None:
    """Deploy on the Ray cluster at RAY_ADDRESS, or on a local Ray started here; serve until SIGINT or SIGTERM,
    then take the deployment down (and the local Ray with it)."""
    require("ray", "ray", "starlette", "uvicorn")
    import ray
    from ray import serve

    from spexport.runtime import load

    folder = str(Path(folder).resolve())
    load(folder)  # refuse a bad artifact here, in one line, before any replica starts
    joined = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(Replica, name=DEPLOYMENT, num_replicas=replicas,
                                      ray_actor_options={"num_cpus": 0})
        serve.run(deployment.bind(folder, max_batch_size), name=DEPLOYMENT, route_prefix="/")
        print(f"spexport: {replicas} replica(s) of {folder} serving on http://{host}:{port}", flush=True)
        while not stop.wait(0.5):
            pass
        serve.delete(DEPLOYMENT)  # waits for the replicas' requests in flight
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not joined:
            serve.shutdown()
        ray.shutdown()
