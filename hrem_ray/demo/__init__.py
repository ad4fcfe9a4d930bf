"""The end-to-end demo: its stages (``pipeline``) and its HTML report (``report``)."""
