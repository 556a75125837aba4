"""fastsam2-run: track prompted objects through a video, a frames folder, a camera or a stream
with a bundle (no torch). A thin layer over fastsam2.runtime.track.track()."""

from __future__ import annotations

import sys

import click

from fastsam2.runtime.backends import BACKENDS
from fastsam2.runtime.bank import MAX_COND_FRAMES
from fastsam2.runtime.cli_edge import cli_errors, command_class
from fastsam2.runtime.console import messages
from fastsam2.runtime.errors import InputError
from fastsam2.runtime.resume import CHECKPOINT_NAME

EPILOG = ("Prompt flags take an optional object id and frame: [ID:]VALUE[@FRAME], e.g. --point 2:230,210@6 "
          "(object 2, frame 6), --prompt '2:red ball@12', --remove 2@40. INPUT may be a video, a folder "
          "of frames, a camera (/dev/video0) or a URL (rtsp://, http(s)://, udp://, ...).")


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.argument("input_path", metavar="INPUT")
@click.option("--bundle", default=None, help="Bundle folder written by fastsam2-export (or --server).")
@click.option("--server", default=None, metavar="HOST:PORT",
              help="Track on a Triton server started by fastsam2-serve (its gRPC port) instead of --bundle.")
@click.option("--prompt", "prompts", multiple=True,
              help="[ID:]TEXT[@FRAME]: one of the bundle's text prompts; alone, the object starts at the "
                   "frame's most relevant token.")
@click.option("--point", "points", multiple=True, help="[ID:]x,y[@FRAME]: positive click (input pixels); repeatable.")
@click.option("--neg-point", "neg_points", multiple=True, help="[ID:]x,y[@FRAME]: negative click; repeatable.")
@click.option("--box", "boxes", multiple=True, help="[ID:]x0,y0,x1,y1[@FRAME]: box (input pixels); one per object and frame.")
@click.option("--remove", "removes", multiple=True, help="ID@FRAME: stop tracking the object from FRAME on.")
@click.option("--prompts-file", type=str, default=None,
              help="JSON schedule of prompts and removals (schema: README, 'Prompts file').")
@click.option("--keep", default=None, help="Keep ratio in (0, 1], or 'auto' (per-frame budget from score mass and motion); default: the bundle's.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: the bundle's TensorRT engines if built for this GPU, else the best ONNX Runtime "
                   "(or OpenVINO) backend that starts here.")
@click.option("--out", default="results", show_default=True, help="Output folder (masks/, overlay.mp4, results.json).")
@click.option("--force", is_flag=True,
              help="Replace an earlier run's outputs in --out (the files it recorded as its own; others are refused).")
@click.option("--overlay/--no-overlay", default=True, show_default=True, help="Write overlay.mp4.")
@click.option("--max-frames", type=int, default=None, help="Stop after N frames processed (at most 2^31-1).")
@click.option("--duration", type=float, default=None, help="Stop after SECONDS (live sources; at most 31 days).")
@click.option("--realtime", is_flag=True,
              help="Live sources: process the newest frame, drop those that arrived meanwhile (counted in results.json).")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds a camera or stream may take to open or to deliver the next frame (at most 3600).")
@click.option("--fill", type=click.Choice(["no_mem", "last"]), default="no_mem", show_default=True,
              help="Value of pruned tokens before the decoder: feat + no_mem_embed, or last frame's.")
@click.option("--max-cond-frames", type=click.IntRange(1, MAX_COND_FRAMES), default=None,
              help="Prompted frames each object attends to (the most recent; default 4).")
@click.option("--checkpoint-every", type=int, default=None, metavar="N",
              help=f"Write a checkpoint to --out ({CHECKPOINT_NAME}) every N frames (video files and frame folders).")
@click.option("--resume", is_flag=True,
              help="Go on with the stopped run in --out from its last checkpoint (same INPUT, bundle, --keep, prompts).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: all cores).")
@click.option("--quiet", is_flag=True, help="No progress bar or warnings; only the summary line.")
def main(input_path, bundle, server, prompts, points, neg_points, boxes, removes, prompts_file, keep, backend,
         out, force, overlay, max_frames, duration, realtime, timeout, fill, max_cond_frames, checkpoint_every,
         resume, threads, quiet):
    """Track the prompted object(s) through INPUT."""
    from fastsam2.runtime.prompt_flags import schedule_from_file, schedule_from_flags
    from fastsam2.runtime.track import track

    bar = None

    def say(message):
        if bar is not None:
            bar.clear()
            click.echo(message, err=True)
            bar.refresh()
        else:
            click.echo(message, err=True)

    def progress(i, total, frame):
        nonlocal bar
        if quiet:
            return
        if bar is None:  # made on the first frame: nothing is drawn before the input is checked
            from tqdm import tqdm

            bar = tqdm(unit="frame", desc="tracking", file=sys.stderr, total=total)
        bar.update(1)
        bar.set_postfix(kept=frame["kept_tokens"], refresh=False)

    def stop_bar():
        if bar is not None:
            bar.close()

    # warnings and notes from the libraries: lines on stderr around the progress bar
    with cli_errors(echo=lambda m: (stop_bar(), click.echo(m, err=True))), messages(quiet=quiet, echo=say):
        if (bundle is None) == (server is None):
            raise InputError("give exactly one of --bundle (run here) or --server HOST:PORT (run on a Triton server)")
        b = schedule_from_flags(prompts, points, neg_points, boxes, removes)
        if prompts_file is not None:
            schedule_from_file(prompts_file, b)
        if server is not None:  # the bundle's side of track() is the server's tracker model
            from fastsam2.serve.client import RemoteModel

            bundle = RemoteModel(server)
        res = track(input_path, bundle, b.schedule(), out, keep=keep, backend=backend,
                    overlay=overlay, max_frames=max_frames, fill=fill, threads=threads,
                    progress=progress, realtime=realtime, duration=duration,
                    max_cond_frames=max_cond_frames, force=force, timeout=timeout,
                    checkpoint_every=checkpoint_every, resume=resume)
    stop_bar()
    t = res["totals"]
    dropped = res["dropped_frames"]["count"]
    click.echo(f"{res['video']['frames']} frames -> {out}/ in {t['seconds']:.1f} s ({t['fps']:.2f} FPS, "
               f"{res['backend']}, keep {res['keep']}, {t['mean_kept_tokens']:.0f}/{res['tokens']} tokens"
               + (f", {dropped} dropped" if dropped else "") + ")")
    if res.get("note") and not quiet:
        click.echo(f"note: {res['note']}", err=True)


if __name__ == "__main__":
    main()
