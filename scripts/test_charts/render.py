"""Prints a chart's rendered objects as one JSON array, for tests in other
languages (tests/tests/chart_install.rs):
    python render.py CHART_DIR RELEASE NAMESPACE [VALUES_JSON]"""

import json
import sys
from pathlib import Path

from charts import objects

chart, release, namespace = sys.argv[1:4]
values = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
json.dump(objects(Path(chart), values, release, namespace), sys.stdout)
