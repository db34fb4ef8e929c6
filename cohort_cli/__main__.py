"""``python -m cohort_cli``: the ``cohort`` command."""

from cohort_cli.main import main

raise SystemExit(main())
