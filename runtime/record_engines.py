"""`python3 -m fastsam2.runtime.record_engines BUNDLE`: the last step of build_plan.sh.

Records the engines trtexec just built on the device (GPU, compute capability, TensorRT
version, sha256 of each) in engines/<target>/engines.json, so that fastsam2-run uses them.
"""

from __future__ import annotations

import argparse
import sys

from fastsam2.runtime import trt_backend
from fastsam2.runtime.errors import FastSam2Error
from fastsam2.runtime.cli_edge import cli_interrupts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m fastsam2.runtime.record_engines",
                                description="Record the engines build_plan.sh built into the bundle.")
    p.add_argument("bundle", help="the bundle folder")
    args = p.parse_args(argv)
    # engines.json is written atomically; a signal on the way leaves the old one or none
    with cli_interrupts():
        try:
            trt_backend.record_engines(args.bundle)
        except FastSam2Error as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
