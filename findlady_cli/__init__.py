"""The ``findlady`` command line: one argparse parser (``findlady_cli.main``) over the core
library (``spec``, ``attack``, ``resync``, ``verify``, ``watermark``) and the service
(``serve``, ``worker``, ``demo``, ``audit``: ``findlady_cli.service``)."""
