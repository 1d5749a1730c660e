"""The training engine every task shares: where a run executes (``runtime``), the run folder
(``rundir``), its logs (``logs``), optimizers and schedules (``optim``)."""
