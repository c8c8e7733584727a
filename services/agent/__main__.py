"""``python -m services.agent``: the workspace agent."""

import sys

from services.agent.main import main

sys.exit(main())
