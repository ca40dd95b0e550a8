"""``python -m metricops.demo``: see metricops/demo/__init__.py."""

import sys

from .cli import main

main()
sys.exit(0)
