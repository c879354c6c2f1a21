import os
import sys

from .cli import main
from .distributed import launched

if not launched():
    sys.exit(main())
# One of several processes: a failed one exits at once. Python's teardown would destroy gloo's threads
# mid-collective and abort ("terminate called"), so the launcher would see a signal, not this code.
try:
    code = main()
except BaseException:
    sys.excepthook(*sys.exc_info())
    code = 1
if code:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
