"""``python -m taskserver.platform.serve POOL SLOTS [NAME]``: a pool's worker in the foreground.

The warm pool gets the warm lane's worker (SLOTS = its interpreters), every other pool the
priority process worker. What ``taskserver up`` starts per pool. (Running the worker modules
themselves as ``__main__`` would register their worker types a second time, under ``__main__``.)
"""

from __future__ import annotations

from taskserver.platform.worker import main

if __name__ == "__main__":
    main()
