"""fastsam2-profile: time each graph of a bundle per keep ratio (no torch)."""

from __future__ import annotations

import sys

import click

from fastsam2.runtime.backends import BACKENDS
from fastsam2.runtime.cli_edge import Terminated, cli_errors, command_class
from fastsam2.runtime.outputs import RunFolder
from fastsam2.runtime.profiling import CPU_COUNTS, GPU_COUNTS

# what a report folder holds (profile_report.write_report): replaced as a unit with --force
REPORT_OUTPUTS = {"report.json": None, "report.md": None, "latency.png": None}
INTERRUPTED = "the keeps finished so far are in report.json and report.md (status interrupted)"


class _Bars:
    """One tqdm bar per keep on stderr (frames done of warm-up + timed)."""

    def __init__(self):
        self.bar, self.label = None, None

    def __call__(self, done: int, total: int, label: str) -> None:
        if label != self.label:
            from tqdm import tqdm

            self.close()
            self.bar, self.label = tqdm(total=total, desc=label, unit="frame", file=sys.stderr), label
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, help="Bundle folder written by fastsam2-export.")
@click.option("--backend", default="auto", show_default=True, metavar=f"[{'|'.join(BACKENDS)}]",
              help="Runtime backend, as fastsam2-run; comma-separate several to compare (e.g. tensorrt,ort-cuda).")
@click.option("--keep", "keep", default="1.0,0.7,0.5,0.3", show_default=True, help="Keep ratios to time.")
@click.option("--memory-frames", type=int, default=None,
              help="Frames in the memory bank, the conditioning frame (all tokens) included: 1 up to the "
                   "bundle's num_maskmem (default: num_maskmem, a full bank).")
@click.option("--warmup", type=int, default=None,
              help=f"Untimed frames per keep (default: {CPU_COUNTS[0]} on CPU backends, {GPU_COUNTS[0]} on GPUs).")
@click.option("--iters", type=int, default=None,
              help=f"Timed frames per keep (default: {CPU_COUNTS[1]} on CPU backends, {GPU_COUNTS[1]} on GPUs).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores).")
@click.option("--out", default="report", show_default=True, help="Folder for report.json, report.md, latency.png.")
@click.option("--force", is_flag=True, help="Replace an earlier report in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar or warnings; only the summary lines.")
def main(bundle, backend, keep, memory_frames, warmup, iters, threads, out, force, quiet):
    """Time image encoder, router, memory attention, mask decoder and memory encoder separately
    on synthetic inputs with a full memory bank, at each keep ratio. Ctrl-C keeps the keeps
    already measured (report status "interrupted")."""
    from fastsam2.runtime.profile_report import write_report
    from fastsam2.runtime.profiling import plan_profile, profile_bundle

    bars = None if quiet else _Bars()
    report = {}

    def echo_err(m):  # a line between bars: the finished bar first
        if bars is not None:
            bars.close()
        click.echo(m, err=True)

    log = (lambda m: None) if quiet else echo_err
    with cli_errors(echo_err, INTERRUPTED):
        # a bad bundle or setting fails before the report folder is touched
        plan = plan_profile(bundle, backend, keep, memory_frames, warmup, iters, threads)
        # the folder holds one report: locked while profiling; an earlier report refused without
        # --force, replaced whole with it (a plot from an older run never sits beside new numbers);
        # a report.* the folder's record does not list is the user's: refused, force or not
        with RunFolder(out, force=force, outputs=REPORT_OUTPUTS, record=True):
            try:
                profile_bundle(plan["bundle"], backend=plan["backends"], keeps=plan["keeps"],
                               memory_frames=plan["memory_frames"], warmup=warmup, iters=iters,
                               threads=threads, log=log, progress=bars, report=report)
            except BaseException as e:
                if report.get("results"):  # Ctrl-C, SIGTERM or an error: keep what was measured
                    report["status"] = "interrupted" if isinstance(e, (KeyboardInterrupt, Terminated)) else "failed"
                    write_report(report, out, plot=False)  # no plot: matplotlib takes seconds to load
                raise
            finally:
                if bars is not None:
                    bars.close()
            written = write_report(report, out, log=log)
    for r in report["results"]:
        f = r["frame"]
        click.echo(f"{r['backend']} keep {r['keep']:g} (k {r['k']}/{report['geometry']['tokens']}): "
                   f"frame {f['median_ms']:.1f} ms median, {f['fps']:.2f} FPS, "
                   f"memory_attention {r['graphs']['memory_attention']['median_ms']:.1f} ms, "
                   f"peak RSS {r['memory']['peak_rss_mb']:.0f} MB")
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out}/")


if __name__ == "__main__":
    main()
