"""``python -m cratelm.data.bench``: the data benchmarks, by the name the data issue gives
them; the code is `cratelm.bench.data` (every benchmark lives in cratelm/bench/)."""

from cratelm.bench.data import main

if __name__ == "__main__":
    raise SystemExit(main())
