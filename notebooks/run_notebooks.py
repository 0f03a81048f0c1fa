"""Execute the notebooks headless and report how long each took.

    python notebooks/run_notebooks.py                 # every notebook, full settings
    python notebooks/run_notebooks.py --quick 01 03   # quick settings, notebooks 01 and 03

Each Jupytext percent-format notebook (``NN_name.py``) is converted to a notebook, executed
top to bottom in a fresh ipykernel (nbclient) and saved executed, with its outputs, as
``<out>/<name>.ipynb``; its figures go to ``<out>/<name>/``. A cell that raises stops that
notebook, is reported, and makes the exit status non-zero. The table gives wall-clock seconds
and the CPU seconds of the kernel process.

Environment passed to the kernels: ``MEDMETA_NOTEBOOK_QUICK`` (``--quick``),
``MEDMETA_NOTEBOOK_OUT`` (``--out``) and whatever else is set (``MEDIMETA_ROOT`` ...).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(selected: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    if not selected:
        return found
    chosen = [p for p in found if any(p.name.startswith(s) or p.stem == s for s in selected)]
    missing = [s for s in selected if not any(p.name.startswith(s) or p.stem == s for p in found)]
    if missing:
        raise SystemExit(f"run_notebooks: no notebook matches {missing}; have {[p.name for p in found]}")
    return chosen


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def execute(path: Path, out: Path, timeout: int) -> tuple[float, float, str]:
    """Run one notebook; returns (wall s, kernel CPU s, error text or "")."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = jupytext.read(path)
    out.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = children_cpu(), time.perf_counter()
    error = ""
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    finally:
        nbformat.write(nb, out / f"{path.stem}.ipynb")
    return time.perf_counter() - t0, children_cpu() - cpu0, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook names or number prefixes (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller settings (MEDMETA_NOTEBOOK_QUICK=1)")
    parser.add_argument("--out", default=str(HERE / "outputs"), help="output folder (default notebooks/outputs)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    os.environ["MEDMETA_NOTEBOOK_QUICK"] = "1" if args.quick else "0"
    os.environ["MEDMETA_NOTEBOOK_OUT"] = str(out)
    os.environ.setdefault("MPLBACKEND", "Agg")
    rows, failed = [], 0
    for path in notebooks(args.notebooks):
        print(f"running {path.name} ({'quick' if args.quick else 'full'}) ...", flush=True)
        wall, cpu, error = execute(path, out, args.timeout)
        failed += bool(error)
        rows.append((path.name, wall, cpu, error or "ok"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'notebook':<{width}}  {'mode':>5}  {'wall s':>7}  {'cpu s':>7}  result")
    for name, wall, cpu, result in rows:
        print(f"{name:<{width}}  {'quick' if args.quick else 'full':>5}  {wall:7.1f}  {cpu:7.1f}  {result}")
    print(f"executed notebooks and figures in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
