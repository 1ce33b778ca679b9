"""Run the llmeraser command line with one rank made to fail at its K-th collective (for test_distributed.py).

Environment: FAULT=kill (SIGKILL itself: a rank that dies) or hang (sleep: a rank that stops answering),
FAULT_RANK, FAULT_AT (1-based count of the rank's collectives). Usage: torchrun ... tests/dist_fault.py ARGS...
"""

import os
import signal
import sys
import time

from llmeraser import distributed
from llmeraser.cli import main

_real = distributed._collective
_count = 0


def _faulty(op, tensor, what, **kw):
    global _count
    _count += 1
    if distributed.rank() == int(os.environ["FAULT_RANK"]) and _count == int(os.environ["FAULT_AT"]):
        print(f"fault: rank {distributed.rank()} {os.environ['FAULT']}s at collective {_count} ({what})",
              file=sys.stderr, flush=True)
        if os.environ["FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    return _real(op, tensor, what, **kw)


distributed._collective = _faulty
sys.exit(main(sys.argv[1:]))
