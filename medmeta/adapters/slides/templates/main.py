"""VisioMel submission entry point (template).

The container unzips the submission next to a read-only ``data/`` folder (test slides,
``test_metadata.csv``, ``submission_format.csv``) and runs ``python main.py``. This script loads
the model from ``assets/`` (written by ``medmeta.adapters.slides.visiomel.train_visiomel``),
predicts every slide within the time budget and writes ``submission.csv`` beside itself. It logs
progress (slide numbers only), never data values. Per-slide failures get the training prior and
are listed in ``submission_report.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from medmeta.adapters.slides.visiomel import main

ROOT = Path(__file__).resolve().parent
#: The challenge allows 8 hours; leave a margin for start-up and writing.
TIME_BUDGET_SECONDS = 7.5 * 3600

if __name__ == "__main__":
    sys.exit(
        main(
            [
                "--data-dir", str(ROOT / "data"),
                "--assets", str(ROOT / "assets"),
                "--output", str(ROOT / "submission.csv"),
                "--time-budget", str(TIME_BUDGET_SECONDS),
                *sys.argv[1:],
            ]
        )
    )
