"""``python -m cohort_cli``: the ``cohort`` command."""

from cohort_cli.entry import main

raise SystemExit(main())
