"""``python -m ifsearch.tracking_server``: the local MLflow server (``ifsearch.tracking.server``).

A thin entry point, so the documented command outlives the package layout; import from
``ifsearch.tracking.server`` in code.
"""

import sys

from ifsearch.tracking.server import main

if __name__ == "__main__":
    sys.exit(main())
