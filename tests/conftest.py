"""Every test, and every process a test starts (the router, pyinfra, the bench, the lab), runs
the code of this checkout, whatever an earlier `pip install -e` elsewhere left installed."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
_existing = os.environ.get("PYTHONPATH")
os.environ["PYTHONPATH"] = ROOT + (os.pathsep + _existing if _existing else "")
