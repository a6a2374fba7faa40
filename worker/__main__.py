"""`python -m worker <celery worker options>`: a Celery worker of thaw's app.

`thaw worker` starts this; Celery's own `--app` wants an app built at import, which this is not.
"""

import sys

from worker.celery_app import worker_app

sys.exit(worker_app().start(["worker", *sys.argv[1:]]))
