"""``python -m wanexp.data check ROOT [OVERRIDE ...]``: the data check (wanexp.data.check)."""

import sys

from wanexp.data.check import main

sys.exit(main())
