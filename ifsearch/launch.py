"""``python -m ifsearch.launch``: the search service's command (code in ``ifsearch.search.cli``).

A thin entry point, so the documented command outlives the package layout; import from
``ifsearch.search`` in code.
"""

import sys

from ifsearch.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
