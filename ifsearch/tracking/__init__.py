"""MLflow tracking: the sweep's runs (``runs``) and a local tracking server (``server``).

Nothing is imported here, so ``python -m ifsearch.tracking_server`` does not pay for MLflow's
client and Ray Tune, which ``runs`` imports. ``python -m ifsearch.tracking sync SPOOL`` replays a
spool file of a sweep that lost its server (``__main__``).
"""
