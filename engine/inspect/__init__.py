"""``engine inspect`` and the scan behind ``engine check``: find a dataset's files (``source``), stream
them once (``scan``, ``leakage``), count (``summary``) and render one HTML page (``report_html``);
``report`` ties them together."""
