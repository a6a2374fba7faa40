"""`thaw`: run the service, a worker, migrations, and manage API keys (operator commands, in
`operator.py`); and, as a client of a running server (`--url`/`THAW_URL`, `--api-key`/
`THAW_API_KEY`), datasets, jobs, models, predict, experiments, webhook (client commands, one
module per domain).
"""

import typer

from service.cli import datasets, experiments, jobs, models, operator, predict, webhook
from service.cli.operator import MIGRATIONS, migrate_database

__all__ = ["MIGRATIONS", "app", "migrate_database"]

app = typer.Typer(help="thaw: a self-hosted transfer-learning service.", no_args_is_help=True)
app.command()(operator.migrate)
app.command()(operator.worker)
app.command()(operator.serve)
app.command()(operator.api)
app.add_typer(operator.keys_app, name="keys")
app.add_typer(datasets.datasets_app, name="datasets")
app.add_typer(jobs.jobs_app, name="jobs", no_args_is_help=True)
app.add_typer(models.models_app, name="models", no_args_is_help=True)
app.add_typer(experiments.experiments_app, name="experiments", no_args_is_help=True)
app.add_typer(webhook.webhook_app, name="webhook", no_args_is_help=True)
app.command()(predict.predict)
