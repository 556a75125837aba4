"""fastsam2-run: track a prompted object through a video with a bundle (no torch)."""

from __future__ import annotations

import sys

import click

from fastsam2.runtime.backends import BACKENDS
from fastsam2.runtime.errors import FastSam2Error, InputError


def _xy(text: str, n: int, what: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise InputError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def _split_id(text: str) -> tuple:
    """"2:300,120" -> (2, "300,120"); no "N:" prefix -> object 1."""
    head, sep, rest = text.partition(":")
    if sep and head.strip().isdigit():
        return int(head), rest
    return 1, text


def object_prompts(prompts, points, neg_points, boxes) -> dict:
    """{object id: PromptSpec} from the flags; each value may start with "ID:" (default 1)."""
    from fastsam2.runtime.track import PromptSpec

    objs = {}

    def spec(o):
        return objs.setdefault(o, PromptSpec())

    for t in prompts:
        o, text = _split_id(t)
        if spec(o).text is not None:
            raise InputError(f"object {o} has two --prompt values; give one text per object")
        spec(o).text = text
    for p in points:
        o, xy = _split_id(p)
        spec(o).points.append(_xy(xy, 2, "--point"))
    for p in neg_points:
        o, xy = _split_id(p)
        spec(o).neg_points.append(_xy(xy, 2, "--neg-point"))
    for b in boxes:
        o, box = _split_id(b)
        if spec(o).box is not None:
            raise InputError(f"object {o} has two --box values; give one box per object")
        spec(o).box = _xy(box, 4, "--box")
    return objs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT")
@click.option("--bundle", required=True, help="Bundle folder written by fastsam2-export.")
@click.option("--prompt", "prompts", multiple=True,
              help="Text prompt (one of the bundle's precomputed prompts). Every prompt flag takes "
                   "an optional object id, e.g. --prompt 2:ball --point 2:300,120 (default: object 1).")
@click.option("--point", "points", multiple=True, help="Positive click [ID:]x,y on the first frame (input pixels); repeatable.")
@click.option("--neg-point", "neg_points", multiple=True, help="Negative click [ID:]x,y on the first frame; repeatable.")
@click.option("--box", "boxes", multiple=True, help="Box [ID:]x0,y0,x1,y1 on the first frame (input pixels); one per object.")
@click.option("--keep", default=None, help="Keep ratio in (0, 1], or 'auto' (per-frame budget from score mass and motion); default: the bundle's.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: the bundle's TensorRT engines if built for this GPU, else ONNX Runtime "
                   "with TensorRT, CUDA or CPU (the first that starts).")
@click.option("--out", default="results", show_default=True, help="Output folder (masks/, overlay.mp4, results.json).")
@click.option("--overlay/--no-overlay", default=True, show_default=True, help="Write overlay.mp4.")
@click.option("--max-frames", type=int, default=None, help="Stop after N frames.")
@click.option("--fill", type=click.Choice(["no_mem", "last"]), default="no_mem", show_default=True,
              help="Value of pruned tokens before the decoder: feat + no_mem_embed, or last frame's.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--quiet", is_flag=True, help="No progress bar or warnings; only the summary line.")
def main(input_path, bundle, prompts, points, neg_points, boxes, keep, backend, out, overlay,
         max_frames, fill, threads, quiet):
    """Track the prompted object(s) through INPUT (a video file or a folder of frames)."""
    from fastsam2.runtime.track import track

    bar = None
    try:
        spec = object_prompts(prompts, points, neg_points, boxes)
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(unit="frame", desc="tracking", file=sys.stderr)

        def progress(i, total, frame):
            if bar is not None:
                bar.total = total
                bar.update(1)
                bar.set_postfix(kept=frame["kept_tokens"], refresh=False)

        res = track(input_path, bundle, spec, out, keep=keep, backend=backend, overlay=overlay,
                    max_frames=max_frames, fill=fill, threads=threads, progress=progress,
                    warn=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    except FastSam2Error as e:
        if bar is not None:
            bar.close()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    if bar is not None:
        bar.close()
    t = res["totals"]
    click.echo(f"{res['video']['frames']} frames -> {out}/ in {t['seconds']:.1f} s ({t['fps']:.2f} FPS, "
               f"{res['backend']}, keep {res['keep']}, {t['mean_kept_tokens']:.0f}/{res['tokens']} tokens)")


if __name__ == "__main__":
    main()
