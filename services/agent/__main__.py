"""``python -m services.agent``: the workspace agent (how the local driver starts it)."""

import sys

# The agent never uses Python's ssl (grpc brings its own TLS) nor OpenSSL's hashes (hashlib falls
# back to its built-in sha256): not loading libcrypto keeps an idle agent ~5 MB smaller, and a
# host runs hundreds of them.
for _name in ("ssl", "_ssl", "_hashlib"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

from services.agent.main import main  # noqa: E402

sys.exit(main())
