"""fastsam2-profile: time each graph of a bundle per keep ratio (no torch)."""

from __future__ import annotations

import sys

import click

from fastsam2.runtime.errors import FastSam2Error, InputError
from fastsam2.runtime.cli_edge import cli_interrupts
from fastsam2.runtime.outputs import RunFolder

# what a report folder holds (profile_report.write_report): replaced as a unit by each run
REPORT_OUTPUTS = {"report.json": None, "report.md": None, "latency.png": None}


def _keeps(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--keep must be comma-separated numbers in (0, 1], got {text!r}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, help="Bundle folder written by fastsam2-export.")
@click.option("--backend", default="auto", show_default=True,
              help="auto, ort-cpu, ort-cuda, ort-trt or tensorrt; comma-separate several to compare.")
@click.option("--keep", "keep", default="1.0,0.7,0.5,0.3", show_default=True, help="Keep ratios to time.")
@click.option("--memory-frames", type=int, default=7, show_default=True,
              help="Frames in the memory bank, the conditioning frame (all tokens) included.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed frames per keep.")
@click.option("--iters", type=int, default=50, show_default=True, help="Timed frames per keep.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--out", default="report", show_default=True, help="Folder for report.json, report.md, latency.png.")
@click.option("--quiet", is_flag=True, help="Only the summary lines.")
def main(bundle, backend, keep, memory_frames, warmup, iters, threads, out, quiet):
    """Time image encoder, router, memory attention, memory encoder and mask decoder separately
    on synthetic inputs with a full memory bank, at each keep ratio."""
    from fastsam2.runtime.bundle import read_manifest
    from fastsam2.runtime.profile_report import write_report
    from fastsam2.runtime.profiling import profile_bundle

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    with cli_interrupts(lambda m: click.echo(m, err=True)):
        try:
            keeps = _keeps(keep)
            read_manifest(bundle)  # a bad bundle fails before the report folder is touched
            # the folder holds one report: locked while profiling, an earlier report replaced
            # whole (a plot from an older run never sits beside new numbers)
            with RunFolder(out, force=True, outputs=REPORT_OUTPUTS):
                report = profile_bundle(bundle, backend=backend, keeps=keeps, memory_frames=memory_frames,
                                        warmup=warmup, iters=iters, threads=threads, log=log)
                written = write_report(report, out, log=log)
        except FastSam2Error as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(e.exit_code)
    for r in report["results"]:
        f = r["frame"]
        click.echo(f"{r['backend']} keep {r['keep']:g} (k {r['k']}/{report['geometry']['tokens']}): "
                   f"frame {f['median_ms']:.1f} ms median, {f['fps']:.2f} FPS, "
                   f"memory_attention {r['graphs']['memory_attention']['median_ms']:.1f} ms, "
                   f"peak RSS {r['memory']['peak_rss_mb']:.0f} MB")
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out}/")


if __name__ == "__main__":
    main()
