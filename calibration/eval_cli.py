"""fastsam2-eval: DAVIS 2017 J&F of a results folder, or of a bundle run over DAVIS first.

A thin layer over fastsam2.calibration.davis; user errors become one `error:` line and exit 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from fastsam2.calibration import davis
from fastsam2.runtime.backends import BACKENDS
from fastsam2.runtime.cli_edge import cli_errors, command_class
from fastsam2.runtime.console import messages
from fastsam2.runtime.errors import InputError
from fastsam2.runtime.outputs import RunFolder

log = logging.getLogger(__name__)


def run_outputs(names, split) -> dict:
    """What run mode writes into --out (RunFolder's names): <seq>/<frame>.png and the CSVs."""
    out = {seq: r"[^/]+\.png" for seq in names}
    out.update({f"global_results-{split}.csv": None, f"per-sequence_results-{split}.csv": None})
    return out


def track_davis(davis_root, split, bundle_dir, out_dir, keep=None, backend="auto", sequences=None,
                threads=None):
    """Run the bundle on each sequence from its first annotation, writing <out>/<seq>/<frame>.png.
    keep None: the bundle's; "auto": the per-frame budget, as fastsam2-run. Logs one line per
    sequence tracked."""
    try:
        # imported here so scoring never needs the runtime's backends installed
        from fastsam2.runtime.backends import check_threads
        from fastsam2.runtime.bundle import load_bundle
        from fastsam2.runtime.prompts import parse_keep
        from fastsam2.runtime.track import track_davis_sequence
    except ImportError as e:
        raise InputError(f"run mode needs the fastsam2 runtime (fastsam2.runtime.track): {e}") from None
    check_threads(threads)
    keep = None if keep is None else parse_keep(keep)
    bundle = load_bundle(bundle_dir)  # checked once, not once per sequence
    names = davis.list_sequences(davis_root, split) if sequences is None else list(sequences)
    for n, seq in enumerate(names, 1):
        images, annotations = davis.sequence_files(davis_root, seq)
        r = track_davis_sequence(bundle_dir, images[0].parent, annotations[0], Path(out_dir) / seq,
                                 keep=keep, backend=backend, threads=threads, bundle=bundle)
        log.info(f"[{n}/{len(names)}] {seq}: {r['frames']} frames, {len(r['objects'])} objects, "
                 f"{r['seconds']:.1f} s")


def _score(davis_root, split, results_dir, sequences):
    global_row, per_seq_rows = davis.evaluate_davis(davis_root, results_dir, split, sequences)
    g_path, s_path = davis.write_result_csvs(results_dir, split, global_row, per_seq_rows)
    click.echo(f"--------------------------- Global results for {split} ---------------------------")
    click.echo(davis.format_global_table(global_row))
    click.echo(f"global results: {g_path}")
    click.echo(f"per-sequence results: {s_path}")


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--davis", "davis_root", required=True, help="DAVIS 2017 folder (JPEGImages/, Annotations/, ImageSets/).")
@click.option("--split", default="val", show_default=True, help="ImageSets/2017/<split>.txt to score.")
@click.option("--results", "results_dir", default=None, help="Score this folder of <seq>/<frame>.png masks.")
@click.option("--sequences", default=None, help="Comma-separated sequences instead of the whole split.")
@click.option("--bundle", "bundle_dir", default=None, help="Run this bundle over DAVIS first (run mode).")
@click.option("--keep", default=None, help="Keep ratio in (0, 1], or 'auto' (per-frame budget), as fastsam2-run "
                                           "(run mode; default: the bundle's).")
@click.option("--out", "out_dir", default=None, help="Where run mode writes its masks, then scores them.")
@click.option("--force", is_flag=True, help="Replace an earlier run's masks in --out (run mode).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Runtime backend, as fastsam2-run (run mode).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores; run mode).")
@click.option("--quiet", is_flag=True, help="No line per tracked sequence; only the results.")
def main(davis_root, split, results_dir, sequences, bundle_dir, keep, out_dir, force, backend, threads, quiet):
    """Score DAVIS 2017 semi-supervised results with the official J&F definitions."""
    seqs = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    with cli_errors(echo), messages(err=True, quiet=quiet):
        if bundle_dir is not None:
            if results_dir is not None:
                raise InputError("give either --results (score) or --bundle (run then score), not both")
            if not out_dir:
                raise InputError("run mode needs --bundle and --out")
            names = davis.list_sequences(davis_root, split)  # a bad DAVIS folder fails before tracking
            # one folder = one run: locked while it runs and is scored; an earlier run's
            # masks (any sequence of the split) refused without --force, replaced with it; masks
            # and CSVs the folder's record does not list are the user's: refused, force or not
            with RunFolder(out_dir, force=force, outputs=run_outputs(names, split), record=True):
                track_davis(davis_root, split, bundle_dir, out_dir, keep, backend, seqs or names, threads)
                _score(davis_root, split, out_dir, seqs)
        elif results_dir is None:
            raise InputError("give --results to score, or --bundle and --out to run then score")
        else:
            _score(davis_root, split, results_dir, seqs)


if __name__ == "__main__":
    main()
