"""`quiver-serve`: uvicorn with the QUIVER_* settings (README, "Service settings").

Flags override the environment for a quick local run; everything else is an environment variable, as in a container.
Several workers on Linux run under service/workers.py's supervisor (a socket per worker), elsewhere under uvicorn's.
"""

import argparse
import os
import sys

import uvicorn
from pydantic import ValidationError

from models.errors import QuiverError
from service.cpus import plan
from service.settings import Settings
from service.workers import APP, balanced, supervise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quiver-serve", description="Serve /recall and /rank over published bundles")
    p.add_argument("--host", default=None, help="bind address (QUIVER_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (QUIVER_PORT)")
    p.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (QUIVER_WORKERS)")
    args = p.parse_args(argv)
    for flag, env in ((args.host, "QUIVER_HOST"), (args.port, "QUIVER_PORT"), (args.workers, "QUIVER_WORKERS")):
        if flag is not None:
            os.environ[env] = str(flag)  # the app (and each worker process) reads its settings from the environment
    try:
        settings = Settings()
    except ValidationError as err:
        for e in err.errors():
            name = "QUIVER_" + "_".join(str(x) for x in e["loc"]).upper()
            print(f"quiver-serve: {name}: {e['msg']}", file=sys.stderr)
        return 2
    if settings.model_process:
        try:  # a CPU this machine does not let it use: refused here, not as a traceback from the app's start
            plan(settings.model_cpus, settings.torch_threads, settings.workers)
        except QuiverError as err:
            print(f"quiver-serve: {err}", file=sys.stderr)
            return 2
    # per-request log lines cost more than the request at this scale; /metrics has the counts
    options = {"log_level": settings.log_level, "access_log": False}
    if settings.workers > 1 and balanced():
        return supervise(settings.workers, settings.host, settings.port, options)
    uvicorn.run(APP, factory=True, host=settings.host, port=settings.port, workers=settings.workers, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
