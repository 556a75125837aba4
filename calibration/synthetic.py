"""`python -m fastsam2.calibration.synthetic` and `from fastsam2.calibration.synthetic import
make_video` keep working: the generator lives in fastsam2.runtime.synthetic, below export (its
precision gate tracks generated videos) and calibration alike, so neither imports the other."""

from fastsam2.runtime.synthetic import SyntheticVideo, main, make_davis_layout, make_video  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
