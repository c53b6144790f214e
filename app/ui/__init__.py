"""The dashboard's static files (HTML, ES modules, CSS), served by ``app.api.routes.ui``."""
