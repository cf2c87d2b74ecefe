"""``python -m ifsearch.tracking sync SPOOL``: replay a sweep's MLflow spool file (see ``runs``)."""

import sys

from ifsearch.tracking.runs import main

sys.exit(main())
