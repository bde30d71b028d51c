"""The two front doors: the command line (``api.cli``) and the FastAPI service (``api.app``)."""
