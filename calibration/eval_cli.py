"""fastsam2-eval: DAVIS 2017 J&F of a results folder, or of a bundle run over DAVIS first.

A thin layer over fastsam2.calibration.davis; user errors become one `error:` line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastsam2.calibration import davis
from fastsam2.runtime.errors import FastSam2Error, InputError


def track_davis(davis_root, split, bundle_dir, out_dir, keep, backend="ort-cpu", sequences=None):
    """Run the bundle on each sequence from its first annotation, writing <out>/<seq>/<frame>.png."""
    try:
        # imported here so scoring never needs the runtime's backends installed
        from fastsam2.runtime.track import track_davis_sequence
    except ImportError as e:
        raise InputError(f"run mode needs the fastsam2 runtime (fastsam2.runtime.track): {e}") from None
    names = davis.list_sequences(davis_root, split) if sequences is None else list(sequences)
    for seq in names:
        images, annotations = davis.sequence_files(davis_root, seq)
        track_davis_sequence(bundle_dir, images[0].parent, annotations[0], Path(out_dir) / seq,
                             keep=keep, backend=backend)


def _score(davis_root, split, results_dir, sequences):
    global_row, per_seq_rows = davis.evaluate_davis(davis_root, results_dir, split, sequences)
    g_path, s_path = davis.write_result_csvs(results_dir, split, global_row, per_seq_rows)
    click.echo(f"--------------------------- Global results for {split} ---------------------------")
    click.echo(davis.format_global_table(global_row))
    click.echo(f"global results: {g_path}")
    click.echo(f"per-sequence results: {s_path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--davis", "davis_root", required=True, help="DAVIS 2017 folder (JPEGImages/, Annotations/, ImageSets/).")
@click.option("--split", default="val", show_default=True, help="ImageSets/2017/<split>.txt to score.")
@click.option("--results", "results_dir", default=None, help="Score this folder of <seq>/<frame>.png masks.")
@click.option("--sequences", default=None, help="Comma-separated sequences instead of the whole split.")
@click.option("--bundle", "bundle_dir", default=None, help="Run this bundle over DAVIS first (run mode).")
@click.option("--keep", type=float, default=None, help="Keep ratio of the router (run mode).")
@click.option("--out", "out_dir", default=None, help="Where run mode writes its masks, then scores them.")
@click.option("--backend", default="ort-cpu", show_default=True, help="Runtime backend (run mode).")
def main(davis_root, split, results_dir, sequences, bundle_dir, keep, out_dir, backend):
    """Score DAVIS 2017 semi-supervised results with the official J&F definitions."""
    seqs = [s.strip() for s in sequences.split(",") if s.strip()] if sequences else None
    try:
        if bundle_dir is not None:
            if results_dir is not None:
                raise InputError("give either --results (score) or --bundle (run then score), not both")
            if out_dir is None or keep is None:
                raise InputError("run mode needs --bundle, --keep and --out")
            davis.list_sequences(davis_root, split)  # fail on a bad DAVIS folder before any tracking
            track_davis(davis_root, split, bundle_dir, out_dir, keep, backend, seqs)
            results_dir = out_dir
        elif results_dir is None:
            raise InputError("give --results to score, or --bundle/--keep/--out to run then score")
        _score(davis_root, split, results_dir, seqs)
    except FastSam2Error as e:
        # one line, whatever the message held: scripts grep stderr
        click.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
