"""`python3 -m fastsam2.runtime.record_engines BUNDLE`: the last step of build_plan.sh.

Records the engines trtexec just built on the device (GPU, compute capability, TensorRT
version, sha256 of each) in engines/<target>/engines.json, so that fastsam2-run uses them.
"""

from __future__ import annotations

import click

from fastsam2.runtime import trt_backend
from fastsam2.runtime.cli_edge import cli_errors, command_class
from fastsam2.runtime.console import messages


@click.command(cls=command_class(), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle")
def main(bundle) -> None:
    """Record the engines build_plan.sh built into BUNDLE (engines/<target>/engines.json)."""
    # engines.json is written atomically; a signal on the way leaves the old one or none
    with cli_errors(lambda m: click.echo(m, err=True)), messages(err=False):  # its line on stdout, as before
        trt_backend.record_engines(bundle)


if __name__ == "__main__":
    main(prog_name="python3 -m fastsam2.runtime.record_engines")
