"""Shared plumbing for the experiment programs: run folders, results, progress, clean failures.

Every experiment writes into its own new run folder (never into an existing one), so nothing a
previous run saved is overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

REPO = Path(__file__).resolve().parent.parent


class ExperimentError(Exception):
  """A user-facing error: printed as one line, exit status 2, no traceback."""


def base_parser(description: str, *, cells: Optional[tuple[str, ...]] = None,
                default_cell: Optional[str] = None) -> argparse.ArgumentParser:
  """An argparse parser with the options every experiment shares."""
  parser = argparse.ArgumentParser(description=description)

  def one_line_error(message):  # argparse's usage errors become one-line errors too
    raise ExperimentError(message)
  parser.error = one_line_error
  parser.add_argument("--quick", action="store_true", help="a small run (well under a minute)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
  parser.add_argument("--out", type=Path, default=REPO / "runs",
                      help="parent folder of the run folder (default runs/)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  if cells:
    parser.add_argument("--cell", default=default_cell or cells[0],
                        help=f"recurrent cell, one of {', '.join(cells)}")
  return parser


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
  choices = tuple(choices)
  if value not in choices:
    raise ExperimentError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
  return value


def check_positive(**values: float) -> None:
  for name, value in values.items():
    if value is None or value <= 0:
      raise ExperimentError(f"--{name.replace('_', '-')} must be positive; got {value}")


def make_run_dir(parent: Path, name: str) -> Path:
  """A new folder `parent/name-YYYYmmdd-HHMMSS[-n]`; an existing folder is never reused."""
  parent = Path(parent)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for n in range(1000):
    path = parent / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
    try:
      path.mkdir(parents=True, exist_ok=False)
      return path
    except FileExistsError:
      continue
  raise ExperimentError(f"could not create a new run folder under {parent}")


def write_json(path: Path, obj: Any) -> None:
  """Write JSON atomically (temp file, fsync, rename): a crash leaves the old file or the new."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=2, default=float)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "",
             disable: bool = False):
  """A tqdm progress bar when tqdm is installed (the experiments extra), else the iterable."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
              mininterval=0.5)


def plt():
  """matplotlib.pyplot with a non-interactive backend, or an ExperimentError if not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
  except ImportError as err:
    raise ExperimentError("plots need matplotlib: pip install -e '.[experiments]'") from err
  return pyplot


def run_config(args: argparse.Namespace, **extra: Any) -> dict:
  """The JSON-able configuration of a run: its arguments (paths as strings), the jaxrnn version,
  the platform, and `extra`."""
  import jax
  import jaxrnn
  config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  config.update(jaxrnn_version=jaxrnn.__version__, platform=jax.devices()[0].platform, **extra)
  return config


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
  """Lay out, write and close a matplotlib figure."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt().close(fig)


def run_main(main) -> None:
  """Call `main()`; turn an ExperimentError into one line on stderr and exit status 2."""
  try:
    status = main()
  except ExperimentError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(status or 0)
