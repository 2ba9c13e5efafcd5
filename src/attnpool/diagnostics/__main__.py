"""``python -m attnpool.diagnostics CAPTURE --out DIR``: see :func:`attnpool.diagnostics.report.main`."""

from attnpool.diagnostics.report import main

raise SystemExit(main())
