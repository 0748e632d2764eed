"""``python -m common.deploy``: the MONAI Deploy application (:mod:`common.deploy.app`)."""

from common.deploy.app import main

raise SystemExit(main())
