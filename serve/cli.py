"""fastsam2-serve: write a Triton model repository for a bundle and run a real tritonserver on it
in the foreground (SIGTERM / Ctrl-C stop it cleanly), or only write it (--write-only) for
NVIDIA's Triton container or a Jetson. A thin layer over serve/repository.py and serve/server.py."""

from __future__ import annotations

import os
import shutil

import click

from fastsam2.runtime.cli_edge import command_class
from fastsam2.runtime.errors import FastSam2Error, InputError

from .repository import DEFAULT_MAX_SESSIONS, LAYOUTS, SERVE_BACKENDS

EPILOG = ("Clients: fastsam2-run INPUT --server HOST:GRPC_PORT --prompt ... The server binds 127.0.0.1 "
          "unless --address says otherwise (0.0.0.0: every interface; put it behind your firewall or "
          "a load balancer, Triton has no authentication).")


# what Triton says at every start on a machine without a GPU: not worth an operator's attention
_CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "pinned memory", "Failed to initialize NVML",
                   "DCGM unable to start")


def _forward(line: str) -> None:
    # Triton's warnings/errors and the tracker's own lines; its start-up tables stay quiet
    if (line[:1] in ("E", "W") or "fastsam2" in line) and not any(n in line for n in _CPU_ONLY_NOISE):
        click.echo(line, err=True)


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--bundle", required=True, help="Bundle folder written by fastsam2-export.")
@click.option("--repo", required=True, help="Model repository folder to write (Triton layout).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="The port clients use (--server HOST:PORT).")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (fastsam2_* gauges).")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address the server binds (0.0.0.0 for every interface).")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Tracker model instances (processes); streams are spread over them.")
@click.option("--backend", type=click.Choice(SERVE_BACKENDS), default="auto", show_default=True,
              help="How the graphs run on the server (as fastsam2-run --backend).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="in-process", show_default=True,
              help="in-process: the tracker runs the graphs (python backend only); graphs: each graph a "
                   "Triton model (onnxruntime/tensorrt backends), called through BLS.")
@click.option("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, show_default=True,
              help="Streams the server holds at once; more are refused.")
@click.option("--idle-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a stream may go without a request before its session is freed (time "
                   "its frames wait behind other streams' frames does not count); keep it above the "
                   "longest gap between two frames of a live stream.")
@click.option("--state-store", default=None, metavar="URL",
              help="Share every stream's memory, so that another node can take a stream over: "
                   "redis://HOST:PORT/DB or file:///DIR (a shared volume); entries expire with --idle-timeout.")
@click.option("--write-only", is_flag=True, help="Only write the repository (for another Triton server).")
def main(bundle, repo, http_port, grpc_port, metrics_port, address, instances, backend, layout,
         max_sessions, idle_timeout, state_store, write_only):
    """Serve a bundle's tracker on Triton Inference Server: one stream per Triton sequence."""
    from fastsam2.runtime.cli_edge import cli_errors

    with cli_errors(echo=lambda m: click.echo(m, err=True), interrupted="tritonserver stopped"):
        _serve(bundle, repo, http_port, grpc_port, metrics_port, address, instances, backend, layout,
               max_sessions, idle_timeout, write_only, state_store)


def _serve(bundle, repo, http_port, grpc_port, metrics_port, address, instances, backend, layout,
           max_sessions, idle_timeout, write_only, state_store=None):
    from .repository import check_idle_timeout, write_repository
    from .server import ADMIN_HEADER, RESTRICTED_GRPC, RESTRICTED_HTTP, Installation, TritonServer

    check_idle_timeout(idle_timeout)
    for name, port in (("--http-port", http_port), ("--grpc-port", grpc_port), ("--metrics-port", metrics_port)):
        if not 1 <= port <= 65535:
            raise InputError(f"{name} must be a TCP port 1..65535, got {port}")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise InputError(f"--http-port, --grpc-port and --metrics-port must differ, got {http_port}, "
                         f"{grpc_port}, {metrics_port}")
    if state_store is not None:  # reachable now, not at the first frame; the model reads it from the env
        from .state_store import STORE_ENV, open_store

        open_store(state_store, ttl=idle_timeout).close()
        os.environ[STORE_ENV] = state_store
    install = None
    if not write_only:  # what the server needs is checked before a 150 MB repository is written
        install = Installation()
        install.check()
        TritonServer(repo, address=address, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                     install=install).check_ports()
    created = not os.path.lexists(repo)
    server, ready = None, False
    try:
        info = write_repository(bundle, repo, instances=instances, backend=backend, layout=layout,
                                max_sessions=max_sessions, idle_timeout=idle_timeout,
                                state_store=state_store is not None, node=f"{address}:{grpc_port}")
        click.echo(f"repository: {repo} ({layout}, backend {backend}, {instances} instance(s), "
                   f"max {max_sessions} sessions, idle timeout {idle_timeout:g} s)", err=True)
        if write_only:
            click.echo(f"serve it with: tritonserver --model-repository {repo} "
                       f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}=<a secret> "
                       f"--grpc-restricted-protocol={RESTRICTED_GRPC}:{ADMIN_HEADER}=<a secret>  (the "
                       f"restrictions keep clients to gRPC inference; the server's Python needs "
                       f"fastsam2[runtime]; see docs/serving.md)", err=True)
            return
        server = TritonServer(repo, address=address, http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, log=_forward, install=install)
        server.start()
        ready = True
        click.echo(f"serving {info['summary'].get('config')} ({info['settings']['image_size']} px) on "
                   f"grpc {address}:{grpc_port}, http {address}:{http_port}, metrics "
                   f"{address}:{metrics_port}; clients: fastsam2-run INPUT --server "
                   f"{server.local_host}:{grpc_port}; Ctrl-C stops", err=True)
        server.serve_forever()
    except FastSam2Error as e:
        _stop(server)
        left = server.killed_stubs if server is not None else []
        more = f"; killed {len(left)} model process(es) it left running (pid {', '.join(map(str, left))})" if left else ""
        if created and not ready:
            shutil.rmtree(repo, ignore_errors=True)  # a start that failed leaves nothing of ours
        raise type(e)(f"{e}{more}") from None
    except BaseException:  # Ctrl-C / SIGTERM: stop the server, then cli_errors' one line
        _stop(server)
        if created and not ready:
            shutil.rmtree(repo, ignore_errors=True)
        raise


def _stop(server):
    """Stop the server; a second Ctrl-C / SIGTERM meanwhile must not cut the cleanup short."""
    import signal

    if server is None:
        return None
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    return server.stop()


if __name__ == "__main__":
    main()
