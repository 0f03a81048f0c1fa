"""``python -m medmeta.adapters.slides.detection``: see :mod:`medmeta.adapters.slides.detection.cli`."""
import sys

from medmeta.adapters.slides.detection.cli import main

sys.exit(main())
