"""fastsam2-serve: write a Triton model repository for a bundle and run a real tritonserver on it
in the foreground (SIGTERM / Ctrl-C stop it cleanly), or only write it (--write-only) for
NVIDIA's Triton container or a Jetson. A thin layer over serve/repository.py and serve/server.py."""

from __future__ import annotations

import sys

import click

from fastsam2.runtime.errors import FastSam2Error

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


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
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
              help="Seconds a stream may go without a request (Triton counts from the last one's arrival, "
                   "queueing included) before its session is freed; keep it above the longest gap "
                   "between two frames of a live stream.")
@click.option("--write-only", is_flag=True, help="Only write the repository (for another Triton server).")
def main(bundle, repo, http_port, grpc_port, metrics_port, address, instances, backend, layout,
         max_sessions, idle_timeout, write_only):
    """Serve a bundle's tracker on Triton Inference Server: one stream per Triton sequence."""
    from fastsam2.runtime.cli_edge import Terminated, signals_as_exceptions

    from .repository import write_repository
    from .server import TritonServer

    server = None
    try:
        with signals_as_exceptions():
            info = write_repository(bundle, repo, instances=instances, backend=backend, layout=layout,
                                    max_sessions=max_sessions, idle_timeout=idle_timeout)
            click.echo(f"repository: {repo} ({layout}, backend {backend}, {instances} instance(s), "
                       f"max {max_sessions} sessions, idle timeout {idle_timeout:g} s)", err=True)
            if write_only:
                click.echo(f"serve it with: tritonserver --model-repository {repo}  (the server's Python "
                           f"needs fastsam2[runtime]; see docs/serving.md)", err=True)
                return
            server = TritonServer(repo, address=address, http_port=http_port, grpc_port=grpc_port,
                                  metrics_port=metrics_port, log=_forward)
            server.start()
            click.echo(f"serving {info['summary'].get('config')} ({info['settings']['image_size']} px) on "
                       f"grpc {address}:{grpc_port}, http {address}:{http_port}, metrics "
                       f"{address}:{metrics_port}; clients: fastsam2-run INPUT --server "
                       f"{server.local_host}:{grpc_port}; Ctrl-C stops", err=True)
            code = server.proc.wait()
            raise FastSam2Error(f"tritonserver stopped by itself (exit code {code}): {server.last_error()}")
    except (KeyboardInterrupt, Terminated) as e:
        how = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        code = _stop(server)
        click.echo(f"stopped ({how}; tritonserver exit code {code})", err=True)
    except FastSam2Error as e:
        _stop(server)
        left = server.killed_stubs if server is not None else []
        more = f"; killed {len(left)} model process(es) it left running (pid {', '.join(map(str, left))})" if left else ""
        click.echo(f"error: {e}{more}", err=True)
        sys.exit(e.exit_code)


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
