"""The training engine every task shares: the loop (``loop``: ``Engine`` and the ``Task`` protocol),
where a run executes (``runtime``), the run folder (``rundir``), its logs (``logs``), optimizers and
schedules (``optim``)."""
