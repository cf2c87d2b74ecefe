"""``python -m ifsearch.export``: best config from MLflow (code in ``ifsearch.search.export``).

A thin entry point, so the documented command outlives the package layout; import from
``ifsearch.search.export`` in code.
"""

import sys

from ifsearch.search.export import main

if __name__ == "__main__":
    sys.exit(main())
