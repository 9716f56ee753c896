"""The lever study: the distribution-shift proxies and the scripts behind model/report/levers.md. Not part
of the product; run from the repository (`python -m studies.robustness`)."""
